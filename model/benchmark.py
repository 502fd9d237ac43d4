"""Timing of the published sampling loop against this engine, on the current device.

(a) the published per-volume loop as the authors run it: fp32, batch 1, ancestral, one network
    evaluation per step; timed over a few warm steps and reported per step;
(b) this engine on the reference study (60 s sampled every 4 s: 16 known volumes, 45 synthetic) with
    its default fast settings; the first (cold) run, which pays for cuDNN autotuning, the batch-size
    probe and torch.compile, is reported separately from the warm runs.
Random weights: timing does not depend on what the network learned.
"""

from __future__ import annotations

import platform
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from model.device import choose_device
from model.engine import EngineSettings, Inpainter, InpaintResult
from model.samplers import ScheduleSpec, sample_ancestral
from model.schedule import PUBLISHED_TIMESTEPS
from model.unet import UNet3D, UNetConfig, network_input

NETWORKS: dict[str, UNetConfig] = {
    "published": UNetConfig(),
    # The published layout at 32 channels and 1 block per level (13.5 M parameters): the demo size.
    "small": UNetConfig(model_channels=32, num_res_blocks=1),
    # For CPU smoke runs only.
    "tiny": UNetConfig(model_channels=32, num_res_blocks=1, channel_mult=(1, 2, 2, 4)),
}


@dataclass(frozen=True)
class BenchSettings:
    network: str = "published"
    volume_shape: tuple[int, int, int] = (8, 192, 192)
    study_duration_s: int = 60
    study_gap_s: int = 4
    published_steps_timed: int = 20
    warm_runs: int = 2
    engine: EngineSettings = EngineSettings()

    @classmethod
    def for_device(cls, device: torch.device) -> BenchSettings:
        """Full size on a GPU; a small smoke configuration on a CPU (not comparable with GPU targets)."""
        if device.type == "cuda":
            return cls()
        return cls(
            network="tiny",
            volume_shape=(8, 32, 32),
            published_steps_timed=2,
            warm_runs=1,
            engine=EngineSettings(steps=2, mask_min_voxels=1),
        )


def flops_per_volume(config: UNetConfig, volume_shape: tuple[int, int, int]) -> int:
    """FLOPs of one forward pass for one volume, counted by PyTorch on the meta device."""
    with torch.device("meta"):
        net = UNet3D(config)
        args = (torch.zeros(1, 3, *volume_shape), torch.zeros(1, 2), torch.zeros(1, 3), torch.zeros(1))
        with FlopCounterMode(display=False) as counter:
            net(*args)
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def reference_study(settings: BenchSettings, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Known volumes (16, D, H, W) in model space with an ellipsoidal 'brain' and their times."""
    times = np.arange(0, settings.study_duration_s + 1, settings.study_gap_s, dtype=np.float64)
    d, h, w = settings.volume_shape
    zz, yy, xx = np.meshgrid(np.linspace(-1, 1, d), np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    brain = (yy**2 / 0.8 + xx**2 / 0.6 + zz**2 / 4) < 1
    rng = np.random.default_rng(seed)
    curve = 30 + 20 * np.exp(-(((times - 25) / 8) ** 2))
    hu = curve[:, None, None, None] + rng.normal(0, 3, (len(times), d, h, w))
    hu = np.where(brain[None], hu, 0.0)
    return (np.clip(hu, 0, 80) / 40 - 1).astype(np.float32), times


def _published_loop_ms_per_step(net: UNet3D, settings: BenchSettings, device: torch.device) -> float:
    d, h, w = settings.volume_shape
    left = torch.rand(1, 1, d, h, w, device=device) * 2 - 1
    right = torch.rand(1, 1, d, h, w, device=device) * 2 - 1
    local = torch.tensor([[0.5, 0.5]], device=device)
    scenario = torch.tensor([[1.0, 0.0, 0.0]], device=device)

    def eps(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return net(network_input(left, x, right), local, scenario, g)

    def run(steps: int) -> None:
        with torch.no_grad():
            sample_ancestral(eps, torch.randn(1, 1, d, h, w, device=device), ScheduleSpec(), steps)

    run(2)  # warm-up: allocator, kernels
    return 1000 * _timed(lambda: run(settings.published_steps_timed), device) / settings.published_steps_timed


def run_benchmark(
    settings: BenchSettings, device: torch.device | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    device = device or choose_device()
    config = NETWORKS[settings.network]
    torch.manual_seed(0)
    net = UNet3D(config).to(device).eval()
    flops = flops_per_volume(config, settings.volume_shape)
    log(f"network {settings.network}: {net.num_parameters():,} parameters, {flops / 1e12:.3f} TFLOP per volume forward")

    log(f"(a) published loop: fp32, batch 1, ancestral, {settings.published_steps_timed} warm steps")
    published_ms = _published_loop_ms_per_step(net, settings, device)

    volumes, times = reference_study(settings)
    engine = Inpainter(net, settings.engine, device=device)
    log(
        f"(b) engine: {len(times)} known volumes every {settings.study_gap_s} s, "
        f"{settings.engine.steps} steps, cold run"
    )
    cold: list[InpaintResult] = []
    cold_s = _timed(lambda: cold.append(engine.inpaint(volumes, times)), device)
    n_targets = len(cold[0].plan.targets)
    volume_steps = n_targets * settings.engine.steps
    warm = []
    for i in range(settings.warm_runs):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        log(f"(b) engine: warm run {i + 1}/{settings.warm_runs}")
        warm.append(_timed(lambda: engine.inpaint(volumes, times), device))
    warm_s = float(np.median(warm))
    peak_gib = (
        torch.cuda.max_memory_allocated(device) / 1024**3
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    )
    engine_ms = 1000 * warm_s / volume_steps
    published_study_s = published_ms / 1000 * PUBLISHED_TIMESTEPS * n_targets
    return {
        "device": _device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "network": settings.network,
        "parameters": net.num_parameters(),
        "volume_shape": list(settings.volume_shape),
        "flops_per_volume_forward": flops,
        "settings": asdict(settings),
        "batch_size": engine.batch_size_for(n_targets, settings.volume_shape),
        "compiled": engine.compiled,
        "published_loop": {
            "ms_per_step": published_ms,
            "tflops": flops / (published_ms / 1000) / 1e12,
            "study_estimate_s": published_study_s,
            "note": f"per-step time x {PUBLISHED_TIMESTEPS} steps x {n_targets} volumes",
        },
        "engine": {
            "synthetic_volumes": n_targets,
            "steps": settings.engine.steps,
            "cold_run_s": cold_s,
            "one_off_cost_s": max(cold_s - warm_s, 0.0),
            "warm_runs_s": warm,
            "study_s": warm_s,
            "ms_per_volume_step": engine_ms,
            "tflops": flops * volume_steps / warm_s / 1e12,
        },
        "peak_memory_gib": peak_gib,
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process max RSS",
        "speedup_per_volume_step": published_ms / engine_ms,
        "speedup_study": published_study_s / warm_s,
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
