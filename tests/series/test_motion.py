"""Motion: rigid registration to the baseline, and the volumes registration cannot rescue.

Phantom studies with partial volume (``supersample``) and 8 HU noise; motion simulated by
rendering the analytic head in another pose (``phantom.motion``), not by moving images.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from ctp_node.config import MotionSettings, Settings
from ctp_node.errors import MotionError
from ctp_node.phantom import PhantomConfig, generate_phantom
from ctp_node.phantom.motion import RigidMotion, SliceMotion
from ctp_node.series import CTPSeries
from ctp_node.series.motion import correct_motion, robust_z

MOVED, STEP, SHIFTED_SLICE = 12, 16, 24  # volumes of the moving study
POSE = RigidMotion(MOVED, rotation_deg=(0.0, 0.0, 3.0), translation_mm=(2.0, -2.5, 0.5))
COMMON = dict(matrix=128, slices=8, duration_s=30, noise_hu=8.0, supersample=3)


def _series(cfg: PhantomConfig) -> CTPSeries:
    study = generate_phantom(cfg)
    return CTPSeries(study.hu, study.times_s, tuple(study.origin_mm), study.spacing_mm)


@pytest.fixture(scope="module")
def still() -> CTPSeries:
    return _series(PhantomConfig(seed=11, **COMMON))


@pytest.fixture(scope="module")
def moving():
    motions = (
        # The whole volume in another pose: a move between volumes, which registration undoes.
        SliceMotion(MOVED, 0, 7, POSE.rotation_deg, POSE.translation_mm),
        # The head moved between slices 3 and 4 of one volume, and one slice of another is shifted.
        SliceMotion(STEP, 4, 7, translation_mm=(3.0, 0.0, 0.0)),
        SliceMotion(SHIFTED_SLICE, 3, 3, translation_mm=(0.0, 3.0, 0.0)),
    )
    series = _series(PhantomConfig(seed=12, slice_motions=motions, **COMMON))
    return series, correct_motion(series)


def _skull_points(n: int = 400) -> np.ndarray:
    rng = np.random.default_rng(0)
    angle = rng.uniform(0, 2 * np.pi, n)
    return np.stack([70 * np.cos(angle), 88 * np.sin(angle), rng.uniform(-15, 15, n)], axis=1)


def test_a_rigidly_moved_volume_is_registered_back(moving, still):
    series, result = moving
    volume = result.volumes[MOVED]
    assert volume.corrected and volume.usable, volume
    # The estimated pose maps reference points where the phantom moved them, within half a millimetre.
    rotation = np.radians(volume.rotation_deg)
    from SimpleITK import Euler3DTransform

    estimated = Euler3DTransform(result.centre_mm, *rotation, volume.translation_mm)
    points = _skull_points()
    truth = points @ POSE.rotation().T + np.asarray(POSE.translation_mm)
    found = np.array([estimated.TransformPoint(tuple(p)) for p in points])
    assert np.abs(found - truth).max() < 0.5
    assert volume.rotation_deg[2] == pytest.approx(3.0, abs=0.3)
    # And the registered volume lines up with its still neighbours far better than the acquired one.
    bone = series.hu[MOVED - 1] > 700
    before = np.abs(series.hu[MOVED] - series.hu[MOVED - 1])[bone].mean()
    after = np.abs(result.series.hu[MOVED] - series.hu[MOVED - 1])[bone].mean()
    assert after < 0.5 * before


def test_cubic_resampling_flags_the_same_volumes_and_realigns_as_well(moving, still):
    series, linear = moving
    cubic = correct_motion(series, MotionSettings(interpolation="bspline"))
    assert np.array_equal(cubic.usable, linear.usable) and np.array_equal(cubic.corrected, linear.corrected)
    bone = series.hu[MOVED - 1] > 700
    for result in (linear, cubic):
        assert (
            np.abs(result.series.hu[MOVED] - series.hu[MOVED - 1])[bone].mean()
            < 0.5 * np.abs(series.hu[MOVED] - series.hu[MOVED - 1])[bone].mean()
        )
    # The cubic kernel keeps more of the acquired sharpness: the realigned volume differs from linear's.
    assert not np.array_equal(cubic.series.hu[MOVED], linear.series.hu[MOVED])


def test_intra_volume_motion_and_a_shifted_slice_are_flagged(moving):
    _, result = moving
    flagged = set(np.flatnonzero(~result.usable).tolist())
    assert flagged == {STEP, SHIFTED_SLICE}
    assert "slice discontinuity" in result.volumes[SHIFTED_SLICE].reasons[0]
    assert "slices 3" in result.volumes[SHIFTED_SLICE].reasons[0]
    assert result.volumes[STEP].slice_step_mm > 1.0 or result.volumes[STEP].residual_mm > 1.0


def test_unmoved_volumes_are_left_as_acquired(moving):
    series, result = moving
    for t in range(series.hu.shape[0]):
        if t not in (MOVED, STEP, SHIFTED_SLICE):
            assert not result.volumes[t].corrected
            assert np.array_equal(result.series.hu[t], series.hu[t])
    assert result.series.hu.shape == series.hu.shape and result.series.origin == series.origin


def test_a_still_study_flags_nothing_and_changes_nothing(still):
    result = correct_motion(still)
    assert result.usable.all(), [v.reasons for v in result.volumes if v.reasons]
    assert not result.corrected.any()
    assert result.series is still  # passed on as it is: no second full-size copy of the series
    assert result.comment() == f"motion: 0 of {still.hu.shape[0]} volumes realigned"
    assert set(result.seconds) >= {"register", "detect", "total"}


def test_a_baseline_volume_off_by_a_few_hu_is_flagged(still):
    hu = still.hu.copy()
    head = hu[2] > -500
    hu[2][head] += 6.0  # e.g. a first-volume calibration offset
    result = correct_motion(CTPSeries(hu, still.times_s, still.origin, still.spacing_mm))
    assert np.flatnonzero(~result.usable).tolist() == [2]
    assert result.volumes[2].reasons[0].startswith("baseline outlier")


def test_the_summary_is_a_json_record_and_the_comment_names_the_unusable(moving):
    _, result = moving
    record = json.loads(json.dumps(result.summary()))
    assert record["unusable"] == sorted([STEP, SHIFTED_SLICE])
    assert record["volumes"][MOVED]["corrected"] is True
    assert "2 unusable" in result.comment() and f"{float(STEP):g} s" in result.comment()


@pytest.mark.parametrize("volumes", [1, 4])
def test_too_few_volumes_are_refused(still, volumes):
    short = CTPSeries(still.hu[:volumes], still.times_s[:volumes], still.origin, still.spacing_mm)
    with pytest.raises(MotionError, match="at least 5"):
        correct_motion(short)


def test_nan_voxels_are_refused(still):
    hu = still.hu.copy()
    hu[7, 2, 10, 10] = np.nan
    with pytest.raises(MotionError, match=r"volumes \[7\].*NaN"):
        correct_motion(CTPSeries(hu, still.times_s, still.origin, still.spacing_mm))


def test_a_series_without_skull_is_refused(still):
    water = np.full((6, 4, 64, 64), 30.0, dtype=np.float32)
    series = CTPSeries(water, np.arange(6.0), (0.0, 0.0, 0.0), (5.0, 1.0, 1.0))
    with pytest.raises(MotionError, match="no skull"):
        correct_motion(series)


def test_settings_validate_the_bone_window_and_default_on():
    assert Settings().motion.enabled
    with pytest.raises(ValidationError, match="bone_hu"):
        MotionSettings(bone_hu=(1500.0, 700.0))
    with pytest.raises(MotionError, match="reference_volumes"):
        correct_motion(
            CTPSeries(np.zeros((5, 2, 32, 32), np.float32), np.arange(5.0), (0.0, 0.0, 0.0), (5.0, 1.0, 1.0)),
            MotionSettings(reference_volumes=6),
        )


def test_robust_z_ignores_the_outlier_it_measures():
    values = np.array([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 9.0])
    z = robust_z(values)
    assert z[-1] > 50 and np.all(np.abs(z[:-1]) < 2)
    assert np.all(np.isfinite(robust_z(np.ones(5))))


def test_phantom_slice_motion_is_validated_and_only_moves_its_slices():
    with pytest.raises(ValueError, match="slice motion slices"):
        PhantomConfig(slices=8, slice_motions=(SliceMotion(3, 5, 9),))
    with pytest.raises(ValueError, match="slice motion volume"):
        PhantomConfig(duration_s=10, slice_motions=(SliceMotion(10, 0, 0),))
    small = dict(matrix=64, slices=4, duration_s=6)
    plain = generate_phantom(PhantomConfig(**small))
    moved = generate_phantom(PhantomConfig(slice_motions=(SliceMotion(3, 2, 3, translation_mm=(4.0, 0, 0)),), **small))
    changed = np.abs(moved.hu - plain.hu).max(axis=(2, 3)) > 0
    assert changed.nonzero()[0].tolist() == [3, 3] and changed.nonzero()[1].tolist() == [2, 3]
