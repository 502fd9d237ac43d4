"""Smooth random fields defined everywhere in space (random Fourier features).

Per-voxel variation of perfusion and baseline HU should be spatially smooth (physiology varies over
millimetres, not from voxel to voxel) and must be evaluable at any point, so that a rigidly moved
head shows the same tissue values at the same anatomical point. A sum of random cosines with
Gaussian-distributed wave vectors approximates a Gaussian process with a squared-exponential
covariance of the given correlation length, has zero mean and unit variance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COMPONENTS = 12


@dataclass(frozen=True)
class SmoothField:
    """``sqrt(2 / n) * sum_i cos(k_i . x + phase_i)``, evaluated at patient coordinates (mm)."""

    wave_vectors: np.ndarray  # (n, 3) rad/mm
    phases: np.ndarray  # (n,)

    @classmethod
    def random(cls, rng: np.random.Generator, correlation_mm: float) -> SmoothField:
        """A field whose values decorrelate over about ``correlation_mm``."""
        return cls(rng.normal(0.0, 1.0 / correlation_mm, (COMPONENTS, 3)), rng.uniform(0, 2 * np.pi, COMPONENTS))

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """float32 field values, broadcast over the coordinate arrays, clipped to +-2.5."""
        out = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), dtype=np.float32)
        for (kx, ky, kz), phase in zip(self.wave_vectors, self.phases, strict=True):
            out += np.cos(np.float32(kx) * x + np.float32(ky) * y + np.float32(kz) * z + np.float32(phase))
        out *= np.float32(np.sqrt(2.0 / len(self.phases)))
        return np.clip(out, -2.5, 2.5, out=out)
