"""Bad inputs fail early with errors that say what to do."""

from __future__ import annotations

import numpy as np
import pytest

from ctp_node.errors import NoAIFError, PerfusionError
from ctp_node.perfusion import compute_perfusion
from tests.perfusion.synthetic import synthetic_head

TIMES = np.arange(0.0, 30.0, 1.0)


@pytest.fixture(scope="module")
def hu():
    return synthetic_head(TIMES, size=32)[0]


def test_times_length_mismatch(hu):
    with pytest.raises(PerfusionError, match="times_s has 29 values but the series has 30 frames"):
        compute_perfusion(hu, TIMES[:-1])


def test_non_increasing_times(hu):
    times = TIMES.copy()
    times[5] = times[4]
    with pytest.raises(PerfusionError, match="frame 4 is at 4 s and frame 5 at 4 s: sort the volumes"):
        compute_perfusion(hu, times)


def test_too_few_frames(hu):
    with pytest.raises(PerfusionError, match="at least 6 frames"):
        compute_perfusion(hu[:5], TIMES[:5])


def test_not_4d(hu):
    with pytest.raises(PerfusionError, match=r"expected a 4D HU array \(T, Z, Y, X\)"):
        compute_perfusion(hu[:, 0], TIMES)


def test_non_finite_values(hu):
    bad = hu.copy()
    bad[3, 0, 5, 5] = np.nan
    with pytest.raises(PerfusionError, match="NaN or inf"):
        compute_perfusion(bad, TIMES)
    with pytest.raises(PerfusionError, match="NaN or inf"):
        compute_perfusion(hu, np.where(TIMES == 3, np.nan, TIMES))


def test_no_aif_found_without_an_artery():
    hu, truth = synthetic_head(TIMES, size=32)
    hu[:, :, truth["artery"]] = hu[:, :, truth["normal"]][..., :1]  # replace the artery by tissue
    with pytest.raises(NoAIFError, match=r"strongest enhancement in the brain is \d+ HU.*aif_mask"):
        compute_perfusion(hu, TIMES)


def test_no_baseline_when_the_bolus_is_already_there(hu):
    with pytest.raises(PerfusionError, match="no pre-contrast baseline"):
        compute_perfusion(hu[12:], TIMES[12:])


def test_no_enhancement_at_all(hu):
    flat = np.repeat(hu[:1], TIMES.size, axis=0)
    with pytest.raises(PerfusionError, match="no contrast enhancement"):
        compute_perfusion(flat, TIMES)


def test_bad_mask_shape_and_method(hu):
    with pytest.raises(PerfusionError, match=r"brain_mask has shape \(32, 32\)"):
        compute_perfusion(hu, TIMES, brain_mask=np.ones((32, 32), bool))
    with pytest.raises(NoAIFError, match="aif_mask is empty"):
        compute_perfusion(hu, TIMES, aif_mask=np.zeros(hu.shape[1:], bool))
    with pytest.raises(PerfusionError, match="use one of bsvd, osvd, parametric"):
        compute_perfusion(hu, TIMES, method="svd")
