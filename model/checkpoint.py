"""Checkpoints: the published format and this project's own, read through one boundary.

Published format (``torch.save`` of ``{"step", "model", "ema", "lr"}``, either state-dict key may be
missing): each state dict is that of ``DataParallel(GaussianDiffusion)``: network keys under
``module.denoise_fn.``, 12 schedule buffers under ``module.``. The architecture is inferred from the
tensor shapes, so any published-format file loads without flags.

Own format: ``{"format": "ctp-node-checkpoint", "version": 1, "network": UNetConfig dict, "model":
state dict, "ema": state dict (optional), "schedule": {...}, "step": int, ...}`` with unprefixed
keys; training adds optimiser state and its configuration (training/). Optional typed metadata:
``"recommended_sampler"`` (one of ``model.samplers.SAMPLERS``) and ``"recommended_steps"`` (int >= 1),
the sampler and steps measured to suit these weights; the node uses them unless its configuration
or the command line names a sampler or steps (``model.engine.choose_sampling``). Files without them,
and published-format files, load unchanged. ``set_recommended_sampler`` stamps them into a file.

``load_denoiser`` returns a ``LoadedModel``: the network and a typed ``CheckpointInfo``, whose
``noise_schedule`` is the schedule the weights were trained with (own format: the ``"schedule"``
entry; published format: the stored betas), the one the engine samples with.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from model.samplers import SAMPLERS, STORED_SCHEDULE, ScheduleSpec
from model.schedule import SCHEDULE_BUFFER_NAMES, SCHEDULES, NoiseSchedule
from model.unet import UNet3D, UNetConfig

OWN_FORMAT = "ctp-node-checkpoint"
# Phantom-trained weights shipped with the code (model/weights/MODEL_CARD.md): the default of the
# demo and of a node without a configured checkpoint. Simulated data only; not for clinical use.
DEMO_WEIGHTS = Path(__file__).resolve().parent / "weights" / "demo.pt"
OWN_FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """The checkpoint cannot be used; the message names what does not match."""


@dataclass(frozen=True)
class SamplerRecommendation:
    """The sampler and number of steps measured to suit a checkpoint's weights."""

    sampler: str
    steps: int

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise CheckpointError(f"recommended sampler {self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise CheckpointError(f"recommended steps must be an integer >= 1, got {self.steps!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"recommended_sampler": self.sampler, "recommended_steps": self.steps}


def _recommendation(raw: Mapping[str, Any], path: Path) -> SamplerRecommendation | None:
    """The stored recommendation; None when absent. Half of one, or an invalid one, is an error: the
    file was written by something that meant to recommend and got it wrong."""
    sampler, steps = raw.get("recommended_sampler"), raw.get("recommended_steps")
    if sampler is None and steps is None:
        return None
    if sampler is None or steps is None:
        raise CheckpointError(f"{path}: recommended_sampler and recommended_steps must be given together")
    try:
        return SamplerRecommendation(str(sampler), steps)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


@dataclass
class Checkpoint:
    """A denoiser's weights and what is known about them, independent of the file format."""

    config: UNetConfig
    state_dict: dict[str, torch.Tensor]
    source_format: str  # "published" or "ctp-node"
    weights_key: str  # "ema" or "model"
    step: int | None = None
    schedule: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    recommended: SamplerRecommendation | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    noise_schedule: ScheduleSpec = field(default_factory=ScheduleSpec)


@dataclass(frozen=True)
class CheckpointInfo:
    """What is known about a loaded network's weights (plain data; ``to_dict`` for JSON sidecars)."""

    path: str
    format: str  # "published" or "ctp-node"
    weights: str  # "ema" or "model"
    step: int | None
    schedule: dict[str, Any]  # as the file states it
    notes: tuple[str, ...]
    recommended: SamplerRecommendation | None
    noise_schedule: ScheduleSpec  # the schedule to sample with: the one the weights were trained with

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "weights": self.weights,
            "step": self.step,
            "schedule": dict(self.schedule),
            "notes": list(self.notes),
            "recommended": asdict(self.recommended) if self.recommended else None,
        }


class LoadedModel(NamedTuple):
    """A network in eval mode and what its checkpoint says about it (``net, info = load_denoiser(path)``)."""

    net: UNet3D
    info: CheckpointInfo


def strip_prefixes(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a published state dict into network weights (prefixes removed) and schedule buffers."""
    network: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = key.removeprefix("module.")
        if name.startswith("denoise_fn."):
            network[name.removeprefix("denoise_fn.")] = value
        elif name in SCHEDULE_BUFFER_NAMES:
            buffers[name] = value
        else:
            network[name] = value
    return network, buffers


def _shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"not a denoiser state dict of the published network: key {key!r} is missing")
    return tuple(state[key].shape)


def infer_config(state: Mapping[str, torch.Tensor]) -> UNetConfig:
    """Architecture from tensor shapes: base channels, multipliers, blocks per level, attention levels."""
    conv_in = _shape(state, "input_blocks.0.0.weight")
    model_channels, in_channels = conv_in[0], conv_in[1]
    out_channels = _shape(state, "out.2.weight")[0]
    local_dim = _shape(state, "local_context_embed.0.weight")[1]
    scenarios = _shape(state, "global_context_embed_matrix")[0]
    block_ids = sorted({int(m.group(1)) for k in state if (m := re.match(r"input_blocks\.(\d+)\.", k))})
    if block_ids != list(range(len(block_ids))):
        raise CheckpointError(f"input_blocks are not numbered consecutively: {block_ids}")
    down_ids = [i for i in block_ids if f"input_blocks.{i}.0.op.weight" in state]
    levels = len(down_ids) + 1
    res_blocks_total = len(block_ids) - 1 - len(down_ids)
    if res_blocks_total % levels:
        raise CheckpointError(
            f"{res_blocks_total} residual blocks cannot be split evenly over {levels} levels: "
            "not a published-layout UNet"
        )
    num_res_blocks = res_blocks_total // levels
    channel_mult: list[int] = []
    attention: list[int] = []
    block = 1
    for level in range(levels):
        out_ch = _shape(state, f"input_blocks.{block}.0.in_layers.2.weight")[0]
        if out_ch % model_channels:
            raise CheckpointError(f"level {level} has {out_ch} channels, not a multiple of {model_channels}")
        channel_mult.append(out_ch // model_channels)
        if f"input_blocks.{block}.1.qkv.weight" in state:
            attention.append(2**level)
        block += num_res_blocks + (1 if level < levels - 1 else 0)
    try:
        return UNetConfig(
            in_channels=in_channels,
            out_channels=out_channels,
            model_channels=model_channels,
            channel_mult=tuple(channel_mult),
            num_res_blocks=num_res_blocks,
            attention_resolutions=tuple(attention),
            local_context_dim=local_dim,
            num_scenarios=scenarios,
        )
    except ValueError as exc:
        raise CheckpointError(f"inferred architecture is not valid: {exc}") from exc


def _check_keys(net: UNet3D, state: Mapping[str, torch.Tensor], path: Path) -> None:
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs network {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[:3]})")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (first: {wrong[:3]})")
        raise CheckpointError(f"{path}: weights do not fit the network: " + "; ".join(parts))


def _check_schedule(buffers: Mapping[str, torch.Tensor], notes: list[str]) -> dict[str, Any]:
    """Identify the stored schedule; report, do not fail, when it is not the published one."""
    if "betas" not in buffers:
        return {}
    betas = buffers["betas"].double().cpu().numpy()
    n = int(betas.shape[0])
    info: dict[str, Any] = {"timesteps": n, "beta_start": float(betas[0]), "beta_end": float(betas[-1])}
    rebuilt = NoiseSchedule.build("linear", n, float(np.float32(betas[0])), float(np.float32(betas[-1])))
    if np.allclose(rebuilt.betas, betas, rtol=1e-5, atol=1e-9):
        info["schedule"] = "linear"
    else:
        info["schedule"] = "unknown"
        notes.append("stored betas are not a linear schedule: sample with the schedule the model was trained on")
    if info["schedule"] == "linear":
        expected = rebuilt.buffers()
        for name, value in buffers.items():
            if name in expected and not np.allclose(value.double().cpu().numpy(), expected[name], rtol=1e-4, atol=1e-6):
                notes.append(f"schedule buffer {name!r} is inconsistent with the stored betas")
    return info


def _shortest(value: float) -> float:
    """The float64 a float32-stored value was written from, when it was a short decimal (1e-06, not
    9.99999997e-07): the shortest text that reads back as the same float32."""
    return float(str(np.float32(value)))


def _published_schedule(buffers: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> ScheduleSpec:
    """The schedule of a published-format file: the linear one its betas match, else the betas themselves."""
    if "betas" not in buffers:
        return ScheduleSpec()
    betas = buffers["betas"].double().cpu().numpy()
    if info.get("schedule") == "linear":
        spec = ScheduleSpec("linear", int(betas.shape[0]), _shortest(betas[0]), _shortest(betas[-1]))
        if np.allclose(spec.build().betas, betas, rtol=1e-5, atol=1e-9):
            return spec
    return ScheduleSpec(STORED_SCHEDULE, int(betas.shape[0]), betas=tuple(float(b) for b in betas))


def _own_schedule(schedule: Mapping[str, Any], path: Path, notes: list[str]) -> ScheduleSpec:
    """The schedule an own-format file records (``training.config.DiffusionConfig.schedule_info``);
    what it leaves out is the published value (none recorded: the published schedule)."""
    published = ScheduleSpec()
    name = schedule.get("schedule", published.name)
    if name not in SCHEDULES:
        # Written by converting a published file whose betas matched no named schedule: nothing to rebuild.
        notes.append(
            f"the recorded noise schedule {name!r} is not one of {', '.join(SCHEDULES)}: sampling with the "
            "published linear schedule"
        )
        return published
    try:
        return ScheduleSpec(
            str(name),
            int(schedule.get("timesteps", published.timesteps)),
            float(schedule.get("beta_start", published.beta_start)),
            float(schedule.get("beta_end", published.beta_end)),
        )
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: the 'schedule' entry {dict(schedule)} is not a noise schedule (schedule, timesteps, "
            f"beta_start, beta_end): {exc}"
        ) from exc


def _load_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; give the .pt file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {str(exc)[:200]}); "
            "the file may be truncated or corrupt: copy it again and compare its checksum"
        ) from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a {type(raw).__name__}, not a checkpoint dictionary")
    return raw


def read_checkpoint(path: str | Path, *, prefer: str = "ema") -> Checkpoint:
    """Read either format; use ``ema`` weights when present (``prefer="model"`` for raw weights)."""
    path = Path(path)
    raw = _load_file(path)
    order = ("ema", "model") if prefer == "ema" else ("model", "ema")
    key = next((k for k in order if isinstance(raw.get(k), Mapping) and raw.get(k)), None)
    if key is None:
        raise CheckpointError(
            f"{path} has neither an 'ema' nor a 'model' state dict (top-level keys: {sorted(raw)[:10]})"
        )
    notes: list[str] = []
    if raw.get("format") == OWN_FORMAT:
        version = raw.get("version")
        if version != OWN_FORMAT_VERSION:
            raise CheckpointError(f"{path}: ctp-node checkpoint version {version} is not supported (expected 1)")
        try:
            config = UNetConfig.from_dict(dict(raw["network"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: invalid 'network' configuration: {exc}") from exc
        state = dict(raw[key])
        schedule = dict(raw.get("schedule") or {})
        source = "ctp-node"
        recommended = _recommendation(raw, path)
        noise_schedule = _own_schedule(schedule, path, notes)
    else:
        state, buffers = strip_prefixes(raw[key])
        config = infer_config(state)
        schedule = _check_schedule(buffers, notes)
        source = "published"
        recommended = None  # the published format has no such field; extra keys there are not read
        noise_schedule = _published_schedule(buffers, schedule)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state dict entries that are not tensors: {bad[:3]}")
    step = raw.get("step")
    return Checkpoint(
        config=config,
        state_dict=state,
        source_format=source,
        weights_key=key,
        step=int(step) if isinstance(step, (int, float)) else None,
        schedule=schedule,
        notes=notes,
        recommended=recommended,
        raw=raw,
        noise_schedule=noise_schedule,
    )


def build_denoiser(ckpt: Checkpoint, path: str | Path = "<memory>") -> UNet3D:
    """A float32 network holding the checkpoint's weights (bf16-stored weights are upcast)."""
    net = UNet3D(ckpt.config)
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt.state_dict.items()}
    _check_keys(net, state, Path(path))
    net.load_state_dict(state, strict=True)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path}: weights contain NaN or infinite values in {bad[:3]}")
    return net


def load_denoiser(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """The network of a published-format or ctp-node checkpoint, in eval mode on ``device``, and its info."""
    ckpt = read_checkpoint(path)
    net = build_denoiser(ckpt, path)
    info = CheckpointInfo(
        path=str(path),
        format=ckpt.source_format,
        weights=ckpt.weights_key,
        step=ckpt.step,
        schedule=ckpt.schedule,
        notes=tuple(ckpt.notes),
        recommended=ckpt.recommended,
        noise_schedule=ckpt.noise_schedule,
    )
    return LoadedModel(net.to(device).eval(), info)


def save_checkpoint(
    path: str | Path,
    net: UNet3D,
    *,
    ema: UNet3D | None = None,
    step: int = 0,
    schedule: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    extra: Mapping[str, Any] | None = None,
    recommended: SamplerRecommendation | None = None,
) -> Path:
    """Write a ctp-node checkpoint atomically (tmp file, fsync, rename); ``dtype=torch.bfloat16``
    halves the size of inference-only files; ``recommended``: the sampler and steps that suit them."""
    path = Path(path)

    def cast(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().clone()
            for k, v in state.items()
        }

    payload: dict[str, Any] = {
        "format": OWN_FORMAT,
        "version": OWN_FORMAT_VERSION,
        "network": net.config.to_dict(),
        "model": cast(net.state_dict()),
        "step": int(step),
        "schedule": dict(schedule or {}),
    }
    if ema is not None:
        payload["ema"] = cast(ema.state_dict())
    if recommended is not None:
        payload.update(recommended.to_dict())
    if extra:
        clash = set(extra) & set(payload)
        if clash:
            raise ValueError(f"extra keys clash with the checkpoint's own: {sorted(clash)}")
        payload.update(extra)
    if "recommended_sampler" in payload or "recommended_steps" in payload:
        _recommendation(payload, path)  # also when given through ``extra``: never write an invalid one
    _write_atomic(path, payload)
    return path


def set_recommended_sampler(path: str | Path, sampler: str, steps: int) -> Path:
    """Stamp the recommended sampler and steps into an existing ctp-node checkpoint (in place, atomically);
    everything else in the file stays as it was. Published-format files are refused: convert them first."""
    path = Path(path)
    recommended = SamplerRecommendation(sampler, steps)
    raw = _load_file(path)
    if raw.get("format") != OWN_FORMAT:
        raise CheckpointError(
            f"{path} is not a ctp-node checkpoint (published-format files are kept as the authors wrote them); "
            "give the sampler and steps in the configuration instead"
        )
    read_checkpoint(path)  # the file must load before and after
    raw.update(recommended.to_dict())
    _write_atomic(path, raw)
    return path


def _write_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
