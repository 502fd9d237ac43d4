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
        raise RuntimeError(f"device {requested!r} asked for, but only {torch.cuda.device_count()} GPU(s) exist")
    return device


def autocast_dtype(device: torch.device, precision: Precision) -> torch.dtype | None:
    """bf16 autocast on CUDA by default; full float32 on CPU, where bf16 pays only on CPUs with native
    bf16 instructions (AVX512-BF16 / AMX: 1.3x here), so ``precision="bf16"`` opts in there."""
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


def balanced_batch(n_items: int, fit: int) -> int:
    """Even out passes so none runs a tiny remainder: 45 items with room for 32 -> 2 passes of 23."""
    fit = max(1, min(fit, n_items))
    passes = -(-n_items // fit)
    return -(-n_items // passes)


def batch_from_memory(peak_batch1: int, peak_batch2: int, free_bytes: int, budget_bytes: int) -> int:
    """Largest batch whose extrapolated peak (linear in the batch) fits 90 % of what is allowed."""
    per_item = max(peak_batch2 - peak_batch1, 1)
    fixed = max(peak_batch1 - per_item, 0)
    allowed = min(free_bytes, budget_bytes)
    return max(1, int((0.9 * allowed - fixed) // per_item))


def auto_batch_size(
    forward: Callable[[int], object],
    device: torch.device,
    n_items: int,
    *,
    max_memory_gib: float = 20.0,
    cpu_batch: int = 4,
) -> int:
    """Largest balanced batch that fits in free GPU memory and the configured budget.

    Measures the peak memory of real forwards at batch 1 and 2 (inference mode) and extrapolates
    linearly; on CPU uses ``cpu_batch``.
    """
    if n_items <= 0:
        return 1
    if device.type != "cuda":
        return balanced_batch(n_items, cpu_batch)
    peaks = []
    for batch in (1, 2):
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        forward(batch)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
    free, _total = torch.cuda.mem_get_info(device)
    budget = int(max_memory_gib * GIB) - torch.cuda.memory_allocated(device)
    return balanced_batch(n_items, batch_from_memory(peaks[0], peaks[1], free, budget))
