"""Model space and the published tissue mask.

The published data are HU windowed at level 40 / width 80 (clipped to 0..80), skull-stripped (0
outside the brain), and scaled to [-1, 1] for the network.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

WINDOW_LOW_HU = 0.0
WINDOW_HIGH_HU = 80.0
PUBLISHED_MASK_MIN_VOXELS = 6000


def to_model_space(hu: np.ndarray) -> np.ndarray:
    """``clip(v, 0, 80) / 80 * 2 - 1``: windowed HU to [-1, 1] (float32)."""
    clipped = np.clip(np.asarray(hu, dtype=np.float32), WINDOW_LOW_HU, WINDOW_HIGH_HU)
    return clipped / np.float32(WINDOW_HIGH_HU) * 2 - 1


def from_model_space(x: np.ndarray) -> np.ndarray:
    """``(x + 1) * 40``: [-1, 1] back to windowed HU 0..80 (float32)."""
    return (np.asarray(x, dtype=np.float32) + 1) * np.float32(WINDOW_HIGH_HU / 2)


def tissue_mask(known_windowed: np.ndarray, min_voxels: int = PUBLISHED_MASK_MIN_VOXELS) -> np.ndarray:
    """The published inference mask from the known volumes (N, D, H, W) in 0..80 HU.

    Voxels whose sum over the known frames is > 0, connected objects (face connectivity) smaller than
    ``min_voxels`` removed, holes filled in 3D.
    """
    if known_windowed.ndim != 4:
        raise ValueError(f"expected known volumes shaped (N, D, H, W), got {known_windowed.shape}")
    mask = np.asarray(known_windowed, dtype=np.float64).sum(axis=0) > 0
    labels, count = ndimage.label(mask)
    if count:
        sizes = np.bincount(labels.ravel())
        keep = sizes >= min_voxels
        keep[0] = False
        mask = keep[labels]
    return ndimage.binary_fill_holes(mask)
