"""A whole node on loopback for integration tests: receiver, worker, Orthanc, phantom studies."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from ctp_node.config import DicomSettings, Settings
from ctp_node.phantom import PhantomConfig, generate_phantom
from ctp_node.phantom.dicom_study import write_study
from ctp_node.phantom.sampling import parse_schedule, sample_study
from model.checkpoint import save_checkpoint
from model.unet import UNet3D, UNetConfig
from tests.ports import free_port

# Small enough to inpaint an 8 x 192 x 192 slab on a CPU in a second per step.
CPU_NET = UNetConfig(model_channels=8, channel_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=4)


def cpu_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(path, UNet3D(CPU_NET), step=0)


def phantom_files(
    folder: Path,
    *,
    every_s: int = 4,
    duration_s: int = 25,
    syntax: str = "explicit",
    layout: str = "single-frame",
    seed: int = 0,
) -> list[Path]:
    study = generate_phantom(PhantomConfig(matrix=128, slices=8, duration_s=duration_s, noise_hu=4.0, seed=seed))
    series = sample_study(study, parse_schedule(f"every:{every_s}"))
    return write_study(series, folder, layout=layout, transfer_syntax=syntax, uid_seed=f"itest-{seed}")


def node_settings(data_dir: Path, checkpoint: Path, orthanc_port: int | None, **overrides) -> Settings:
    destinations = (
        [{"name": "pacs", "host": "127.0.0.1", "port": orthanc_port, "ae_title": "ORTHANC"}] if orthanc_port else []
    )
    data = {
        "dicom": DicomSettings(ae_title="CTPNODE", bind_address="127.0.0.1", port=free_port()).model_dump(),
        "series": {"quiet_period_s": 1.0, "complete_quiet_period_s": 0.5, "incomplete_wait_s": 3.0},
        "storage": {"data_dir": str(data_dir)},
        "model": {"checkpoint": str(checkpoint), "steps": 1, "device": "cpu"},
        "destinations": destinations,
        "send": {"initial_backoff_s": 0.5, "max_backoff_s": 1.0},
        "jobs": {"lease_s": 30, "heartbeat_s": 5},
    }
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    return Settings(**data)


class Watcher:
    """The receiver's completion watcher on a background thread."""

    def __init__(self, receiver) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=receiver.watch, args=(self.stop,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def write_config(path: Path, settings: Settings) -> Path:
    """The settings as a TOML file for `ctp-node serve` / `worker` subprocesses."""
    import tomli_w

    path.write_text(tomli_w.dumps(settings.to_toml_dict()))
    return path


def start_node_process(verb: str, config: Path, log: Path, *extra: str):
    """`ctp-node serve` or `ctp-node worker` as a real process (stopped by the test by PID)."""
    import subprocess
    import sys

    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "ctp_node", verb, "--config", str(config), "--log-level", "INFO", *extra],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
