"""The perfusion analysis' brain mask and the model grid's: the same voxels where both rules apply,
different rules where the skull is absent (why both exist: ctp_node/perfusion/brain_mask.py)."""

from __future__ import annotations

import numpy as np
import pytest

from ctp_node.errors import GridError
from ctp_node.perfusion.brain_mask import TISSUE_RANGE_HU
from ctp_node.perfusion.brain_mask import brain_mask as perfusion_brain_mask
from ctp_node.phantom import FamilyBConfig, PhantomConfig, generate_family_b, generate_phantom
from ctp_node.series.grid import brain_mask as grid_brain_mask


@pytest.mark.parametrize(
    "study",
    [
        lambda: generate_phantom(PhantomConfig(matrix=96, slices=4, duration_s=6, noise_hu=8.0, seed=5)),
        lambda: generate_family_b(FamilyBConfig(matrix=128, pixel_mm=1.8, slices=4, duration_s=30, seed=5)),
    ],
    ids=["phantom", "family-b"],
)
def test_on_a_closed_skull_both_masks_hold_the_same_brain(study):
    study = study()
    baseline = study.hu[:3].mean(axis=0)
    perfusion = perfusion_brain_mask(baseline)
    grid = grid_brain_mask(baseline.astype(np.float64), study.spacing_mm, erosion_mm=0.0)
    low, high = TISSUE_RANGE_HU
    assert perfusion.sum() > 1000
    assert np.array_equal(perfusion, grid & (baseline > low) & (baseline < high))
    assert np.array_equal(perfusion, study.truth.brain_mask)


def test_without_a_skull_perfusion_uses_soft_tissue_and_the_grid_refuses():
    baseline = np.full((2, 40, 40), -1000.0)
    baseline[:, 10:30, 10:30] = 30.0  # a skull-stripped brain: soft tissue, no bone
    soft = baseline > 0
    perfusion = perfusion_brain_mask(baseline)
    assert not (perfusion & ~soft).any() and perfusion.sum() >= 0.95 * soft.sum()  # the opening takes corners
    with pytest.raises(GridError, match="no intracranial region found"):
        grid_brain_mask(baseline, (5.0, 1.0, 1.0), erosion_mm=0.0)
