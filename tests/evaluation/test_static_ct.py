"""Static real CT and the held-out studies: the harness measures what a network does, not itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ctp_node.evaluation.phantom_study import PhantomEvalSettings, check_family, load_study
from ctp_node.evaluation.static_ct import evaluate_static, load_static_source, offline_head_cts, static_series
from model.engine import LinearInpainter


class _InterpolatingEngine:
    """Stands in for a network: linear interpolation in model space, plus ``bias_hu`` on synthetic seconds."""

    def __init__(self, bias_hu: float = 0.0) -> None:
        self.bias = np.float32(bias_hu / 40.0)  # model space: 80 HU span 2 units

    def inpaint_study(self, slabs, times_s, *, usable=None, progress=None):
        study = LinearInpainter().inpaint_study(slabs, times_s, usable=usable)
        synthetic = study.fill.synthetic
        for sequence in study.sequences:
            sequence[synthetic] += self.bias
            np.clip(sequence, -1, 1, out=sequence)
        return study


@pytest.fixture(scope="module")
def head_ct():
    return load_static_source(offline_head_cts()[0])


def test_pydicom_head_ct_becomes_an_8_slice_static_series(head_ct):
    assert head_ct.hu.shape == (8, 512, 512)
    assert np.array_equal(head_ct.hu[0], head_ct.hu[7])
    assert 20 < float(np.median(head_ct.hu[0][(head_ct.hu[0] > 0) & (head_ct.hu[0] < 80)])) < 50  # brain HU
    series = static_series(head_ct, 8)
    assert series.times_s.tolist() == [0.0, 8.0, 16.0] and np.array_equal(series.hu[0], series.hu[2])


def test_not_ct_is_refused():
    from pydicom.data import get_testdata_file

    with pytest.raises(ValueError, match="not a CT"):
        load_static_source(Path(get_testdata_file("MR_small.dcm", download=False)))


def test_static_measure_sees_a_network_bias_above_the_path_floor(head_ct):
    exact = evaluate_static(_InterpolatingEngine(0.0), head_ct, 4)
    assert exact.synthetic_seconds == 6 and exact.n_voxels > 100_000
    # A network that returns its input scores exactly the floor of the path (resampling there and back).
    assert exact.mean_diff_hu == pytest.approx(exact.floor_mean_diff_hu, abs=1e-6)
    assert exact.mean_abs_diff_hu == pytest.approx(exact.floor_mean_abs_diff_hu, abs=1e-6)
    assert abs(exact.floor_mean_diff_hu) < 0.5
    biased = evaluate_static(_InterpolatingEngine(3.0), head_ct, 4)
    # +3 HU everywhere, less where the window's top (80 HU) clips it.
    assert 2.7 < biased.mean_diff_hu - biased.floor_mean_diff_hu <= 3.0 + 1e-4
    assert biased.worst_second_mean_hu == pytest.approx(biased.mean_diff_hu, abs=0.05)


@pytest.mark.parametrize("family", ["a", "b"])
def test_held_out_study_has_a_noise_free_twin_and_disjoint_tissue_classes(family):
    settings = PhantomEvalSettings(family=family, matrix=96, duration_s=30, noise_hu=6.0)
    study = load_study(settings, 10_000)
    noise = study.hu - study.clean_hu
    assert abs(float(noise.mean())) < 0.1 and 5.0 < float(noise.std()) < 7.5
    clean_again = load_study(PhantomEvalSettings(family=family, matrix=96, duration_s=30, noise_hu=0.0), 10_000)
    assert np.array_equal(clean_again.hu, study.clean_hu)
    masks = list(study.regions.values())
    assert set(study.regions) == {"gm", "wm", "core", "penumbra", "csf"} and all(m.any() for m in masks)
    assert int(np.sum(masks, axis=0).max()) == 1
    assert study.parenchyma.sum() == sum(int(study.regions[t].sum()) for t in ("gm", "wm", "core", "penumbra"))
    assert study.hu.shape[2:] == (96, 96) and study.name == f"phantom-{family}-10000"


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="unknown phantom family"):
        check_family("c")
