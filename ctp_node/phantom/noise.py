"""Spatially correlated CT noise.

Reconstructed CT noise is correlated between neighbouring pixels (the reconstruction kernel
low-passes it), so white noise would look and behave wrong, e.g. it would average away too fast
when the series is resampled to the model grid. We filter Gaussian white noise in-plane with a
separable Gaussian kernel normalised to unit energy: the result has exactly the requested
per-voxel standard deviation. Slices (5 mm) and time points are independent.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import correlate1d


def noise_kernel(sigma_px: float) -> np.ndarray:
    """1D Gaussian kernel of unit energy (sum of squares 1), so filtering keeps the variance."""
    if sigma_px < 0.2:
        return np.ones(1)
    radius = max(1, int(np.ceil(3.0 * sigma_px)))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma_px) ** 2)
    return kernel / np.sqrt(np.sum(kernel**2))


def correlated_noise(rng: np.random.Generator, shape: tuple[int, ...], std_hu: float, sigma_px: float) -> np.ndarray:
    """float32 noise of ``shape`` (..., Y, X), per-voxel std ``std_hu``, in-plane Gaussian correlation.

    The expected correlation of horizontally adjacent pixels is ``exp(-1 / (4 sigma_px**2))``.
    Filtering wraps around the image edges so the statistics are the same everywhere.
    """
    noise = rng.standard_normal(shape, dtype=np.float32)
    kernel = noise_kernel(sigma_px).astype(np.float32)
    if kernel.size > 1:
        correlate1d(noise, kernel, axis=-1, output=noise, mode="wrap")
        correlate1d(noise, kernel, axis=-2, output=noise, mode="wrap")
    noise *= np.float32(std_hu)
    return noise
