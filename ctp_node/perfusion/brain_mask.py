"""Brain mask from the pre-contrast baseline image: inside the skull, soft-tissue attenuation.

Computed on the baseline (not on a contrast frame) so that enhancing arteries, which reach several
hundred HU, are not mistaken for bone.

The node's other brain mask, ``ctp_node.series.grid.brain_mask`` (the voxels the model may change),
gives the same voxels on a head with a closed skull (tested on both phantom families:
tests/perfusion/test_brain_masks.py) but is a different rule where the skull is open or absent: it
seals gaps of the skull ring with closings in millimetres and raises when no skull encloses anything,
while the perfusion analysis falls back to the soft tissue of a slice, so that it also runs on
skull-stripped or skull-base slices. Replacing either by the other would change the synthetic series
or the perfusion maps of such studies, so both stay, each documented for what it is used for.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BONE_HU = 300.0  # cortical bone is well above this; enhanced vessels are not on the baseline
TISSUE_RANGE_HU = (-15.0, 110.0)  # CSF (0-15) .. unenhanced blood (40-60) plus noise; air and fat excluded
CSF_MAX_HU = 20.0  # baseline below this: CSF (phantom CSF 12, WM 29 HU)


def brain_mask(
    baseline_hu: np.ndarray,
    bone_hu: float = BONE_HU,
    tissue_range_hu: tuple[float, float] = TISSUE_RANGE_HU,
) -> np.ndarray:
    """Voxels of the brain in a (Z, Y, X) baseline image.

    Per slice, the non-bone region connected to the image border (air, scalp) is removed, leaving the
    intracranial space; where the skull is open (skull base) nothing is enclosed and the soft-tissue
    voxels of that slice are used instead. The result is restricted to soft-tissue attenuation,
    holes (noise in CSF) are filled, thin bridges are opened and the largest 3D component is kept.
    """
    lo, hi = tissue_range_hu
    bone = baseline_hu > bone_hu
    soft = (baseline_hu > lo) & (baseline_hu < hi)
    mask = np.zeros(baseline_hu.shape, dtype=bool)
    for z in range(baseline_hu.shape[0]):
        labels, _ = ndimage.label(~bone[z])
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        inside = ~bone[z] & ~np.isin(labels, border)
        region = soft[z] & inside if inside.sum() > 0.05 * soft[z].sum() else soft[z]
        region = ndimage.binary_opening(region, iterations=1)
        mask[z] = ndimage.binary_fill_holes(region) & ~bone[z]
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    return mask
