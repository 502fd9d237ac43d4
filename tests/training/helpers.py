"""Tiny data and configurations for the training tests (CPU, seconds per run)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from training.config import TrainConfig, parse_config

SHAPE = (8, 16, 16)
TINY_NETWORK = {"model_channels": 32, "num_res_blocks": 1, "channel_mult": [1, 2], "attention_resolutions": [2]}


def bolus_sequence(frames: int = 8, peak: int = 4, shape: tuple[int, int, int] = SHAPE, seed: int = 0) -> np.ndarray:
    """(D, H, W, T) windowed HU: a random baseline plus a Gaussian bolus peaking at second ``peak``."""
    rng = np.random.default_rng(seed)
    curve = 40.0 * np.exp(-(((np.arange(frames) - peak) / 2.0) ** 2))
    base = rng.uniform(5.0, 30.0, (*shape, 1))
    return np.clip(base + curve * rng.uniform(0.5, 1.0, (*shape, 1)), 0, 80).astype(np.float32)


def write_npy_data(root: Path, n_train: int = 2, n_val: int = 1, frames: int = 8) -> Path:
    """The published layout: root/train/*.npy and root/val/*.npy."""
    for split, count in (("train", n_train), ("val", n_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            np.save(root / split / f"case{i:02d}.npy", bolus_sequence(frames, seed=100 * len(split) + i))
    return root


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) and key != "gap_weights" else value
    return out


def tiny_config_dict(data_root: Path, output: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    base = {
        "network": TINY_NETWORK,
        "diffusion": {"timesteps": 100},
        "data": {"kind": "npy", "root": str(data_root), "volume_shape": list(SHAPE), "max_tr": 4},
        "optim": {"batch_size": 2, "iterations": 4},
        "runtime": {
            "num_workers": 0,
            "log_every": 1,
            "checkpoint_every": 1000,
            "val_every": 0,
            "sample_every": 0,
            "val_batches": 1,
            "sample_steps": 2,
            "progress": False,
            "output": str(output),
        },
    }
    return _merge(base, sections)


def tiny_config(data_root: Path, output: Path, **sections: dict[str, Any]) -> TrainConfig:
    return parse_config(tiny_config_dict(data_root, output, **sections))


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path
