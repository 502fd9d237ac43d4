"""Device, precision and batch-size choices for inference."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Literal

import torch

Precision = Literal["auto", "bf16", "fp32"]
GIB = 1024**3


def choose_device(requested: str | None = None) -> torch.device:
    """The requested device, else CUDA when present, else CPU; a clear error for an unusable request."""
    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RuntimeError(
            f"device {requested!r} asked for, but only {torch.cuda.device_count()} GPU(s) exist"
        )
    return device


def autocast_dtype(device: torch.device, precision: Precision) -> torch.dtype | None:
    """bf16 autocast on CUDA by default; full float32 on CPU (bf16 convolutions are slow there)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" else None


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def auto_batch_size(
    forward: Callable[[int], object],
    device: torch.device,
    n_items: int,
    *,
    max_memory_gib: float = 20.0,
    cpu_batch: int = 4,
) -> int:
    """Largest batch that fits in free GPU memory and the configured budget, balanced over passes.

    Measures the peak memory of real forwards at batch 1 and 2 (inference mode) and extrapolates
    linearly; on CPU returns ``cpu_batch``. Batches are then evened out so no pass runs a tiny
    remainder (for 45 targets and room for 32: two passes of 23 and 22, not 32 and 13).
    """
    if n_items <= 0:
        return 1
    if device.type != "cuda":
        fit = cpu_batch
    else:
        peaks = []
        for batch in (1, 2):
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            forward(batch)
            torch.cuda.synchronize(device)
            peaks.append(torch.cuda.max_memory_allocated(device) - base)
        per_item = max(peaks[1] - peaks[0], 1)
        fixed = max(peaks[0] - per_item, 0)
        free, _total = torch.cuda.mem_get_info(device)
        allowed = min(free, max_memory_gib * GIB - torch.cuda.memory_allocated(device))
        fit = int((0.9 * allowed - fixed) // per_item)
    fit = max(1, min(fit, n_items))
    passes = -(-n_items // fit)
    return -(-n_items // passes)
