"""Sampling schedules: parsing, acquisition times, dropping, interpolation in time."""

from __future__ import annotations

import numpy as np
import pytest

from ctp_node.phantom.sampling import SCAN_START, acquisition_times, parse_schedule, sample_study, subsample


def test_every_n_seconds():
    assert acquisition_times(parse_schedule("every:4"), 60.0).tolist() == list(range(0, 61, 4))
    assert acquisition_times(parse_schedule("every:1"), 60.0).tolist() == list(range(61))


def test_irregular_switches_step_at_the_given_time():
    times = acquisition_times(parse_schedule("irregular:1.5@20,3"), 60.0)
    assert times[:3].tolist() == [0.0, 1.5, 3.0]
    steps = np.diff(times)
    assert np.all(steps[times[:-1] < 20] == 1.5) and np.all(steps[times[:-1] >= 20] == 3.0)
    assert times[-1] <= 60.0 and times[13:16].tolist() == [19.5, 21.0, 24.0]


def test_explicit_non_integer_times_and_drop():
    schedule = parse_schedule("times:0,1.5,3.2,7.25,15", drop=[1])
    assert acquisition_times(schedule, 20.0).tolist() == [0.0, 3.2, 7.25, 15.0]


def test_subsample_is_exact_at_whole_seconds_and_linear_between():
    times = np.arange(5.0)
    hu = np.stack([np.full((2, 3, 3), 10.0 * t, dtype=np.float32) for t in times])
    out = subsample(hu, times, np.array([0.0, 1.5, 3.2, 4.0]))
    assert out.dtype == np.float32
    assert np.array_equal(out[0], hu[0]) and np.array_equal(out[3], hu[4])
    np.testing.assert_allclose(out[1], 15.0)
    np.testing.assert_allclose(out[2], 32.0, rtol=1e-6)
    with pytest.raises(ValueError, match="outside the series"):
        subsample(hu, times, np.array([4.5]))


def test_sample_study_makes_times_relative_and_keeps_the_absolute_start(small_study):
    series = sample_study(small_study, parse_schedule("every:2", drop=[0]))
    assert series.times_s.tolist() == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0]
    assert (series.start - SCAN_START).total_seconds() == 2.0
    assert np.array_equal(series.hu[0], small_study.hu[2])
    assert series.spacing_mm == small_study.spacing_mm


@pytest.mark.parametrize(
    ("spec", "drop", "message"),
    [
        ("every:0", (), "at least 0.001"),
        ("every:x", (), "not a number"),
        ("often:3", (), "unknown kind"),
        ("every", (), "must look like"),
        ("irregular:2,3", (), "@until"),
        ("irregular:1@20,2@10,3", (), "must increase"),
        ("times:3,2", (), "strictly increasing"),
        ("times:0,100", (), "within 0..60"),
        ("every:30", (5,), "drop indices"),
        ("times:0,1", (0,), "fewer than 2"),
    ],
)
def test_bad_schedules_raise_clear_errors(spec, drop, message):
    with pytest.raises(ValueError, match=message):
        acquisition_times(parse_schedule(spec, drop), 60.0)
