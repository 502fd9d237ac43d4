"""Hand-computed plans for the published conditioning rules."""

import numpy as np
import pytest

from model.planner import (
    SCENARIO_FALLING,
    SCENARIO_PEAK,
    SCENARIO_RISING,
    LongGapError,
    PlanError,
    plan_inpainting,
)


def by_second(plan):
    return {t.second: t for t in plan.targets}


def test_uniform_4s_published_rules():
    times = [0, 4, 8, 12, 16, 20]
    sums = [10, 20, 90, 100, 40, 15]  # two largest at seconds 8 and 12 -> peak int((8 + 12) / 2) = 10
    plan = plan_inpainting(times, sums)
    assert plan.peak_second == 10
    assert list(plan.seconds) == list(range(21))
    assert plan.known_seconds == (0, 4, 8, 12, 16, 20)
    t = by_second(plan)
    assert sorted(t) == [s for s in range(21) if s % 4]
    # local context ((t - l - 1) / 6, (r - t - 1) / 6)
    assert t[1].local_context == (0.0, 2 / 6)
    assert t[2].local_context == (1 / 6, 1 / 6)
    assert t[3].local_context == (2 / 6, 0.0)
    # rising: l < P and r <= P; falling: l >= P and r > P; else around the peak
    assert t[5].scenario == SCENARIO_RISING  # 4..8
    assert t[9].scenario == SCENARIO_PEAK  # 8..12 brackets 10
    assert t[13].scenario == SCENARIO_FALLING  # 12..16
    assert t[9].global_context == (0.0, 1.0, 0.0)
    assert plan.max_snap_error_s == 0.0 and not plan.fallback_seconds


def test_gap_2s_uses_argmax():
    plan = plan_inpainting([0, 2, 4, 6, 8], [1, 5, 9, 7, 2])
    assert plan.peak_second == 4
    t = by_second(plan)
    assert t[3].scenario == SCENARIO_RISING  # 2 < 4 and 4 <= 4
    assert t[5].scenario == SCENARIO_FALLING  # 4 >= 4 and 6 > 4
    assert t[3].local_context == (0.0, 0.0)


def test_8s_gap_spans_the_whole_trained_context():
    plan = plan_inpainting([0, 8, 16], [1, 3, 2])
    t = by_second(plan)
    assert t[1].local_context == (0.0, 1.0) and t[7].local_context == (1.0, 0.0)
    assert plan.peak_second == 12  # two largest sums at 8 (3) and 16 (2): int((8 + 16) / 2)


def test_irregular_and_non_integer_times_snap_to_nearest_second():
    times = [0.0, 1.5, 3.0, 6.2, 8.9, 12.4]
    plan = plan_inpainting(times, [1, 2, 3, 9, 8, 2])
    # 1.5 -> 2 (halves round up), 6.2 -> 6, 8.9 -> 9, 12.4 -> 12
    assert list(plan.input_second) == [0, 2, 3, 6, 9, 12]
    assert plan.max_snap_error_s == pytest.approx(0.5)
    assert any("snapped" in n for n in plan.notes)
    t = by_second(plan)
    assert sorted(t) == [1, 4, 5, 7, 8, 10, 11]
    # the brightest frame (6) has a 3 s neighbour gap -> mean of the two largest: int((6 + 9) / 2) = 7
    assert plan.peak_second == 7
    assert t[4].local_context == (0.0, 1 / 6) and t[4].scenario == SCENARIO_RISING
    assert t[8].left == 6 and t[8].right == 9 and t[8].scenario == SCENARIO_PEAK
    assert t[11].scenario == SCENARIO_FALLING


def test_absolute_times_keep_the_scanner_clock():
    plan = plan_inpainting([100.0, 104.0, 108.0], [1, 2, 1])
    assert plan.t0_s == 100.0
    assert list(plan.times_s) == [100.0 + s for s in range(9)]


def test_unusable_volume_is_synthesised_and_widens_the_gap():
    plan = plan_inpainting([0, 4, 8, 12], [1, 2, 3, 4], usable=[True, False, True, True])
    assert plan.known_seconds == (0, 8, 12)
    assert plan.excluded_inputs == (1,)
    t = by_second(plan)
    assert 4 in t and t[4].left == 0 and t[4].right == 8
    assert t[4].local_context == (3 / 6, 3 / 6)
    assert list(plan.input_second) == [0, -1, 8, 12]


def test_unusable_first_volume_trims_the_grid_without_extrapolating():
    plan = plan_inpainting([0, 4, 8, 12], [1, 2, 3, 4], usable=[False, True, True, True])
    assert list(plan.seconds) == list(range(4, 13))
    assert any("not extrapolated" in n for n in plan.notes)


def test_sub_second_sampling_keeps_the_nearest_volume_and_reports_the_other():
    plan = plan_inpainting([0.0, 0.6, 1.1, 3.0], [1, 1, 1, 1])
    # 0.6 and 1.1 both land on second 1; 1.1 is nearer (0.1 s)
    assert list(plan.input_second) == [0, -1, 1, 3]
    assert plan.superseded_inputs == (1,)
    assert any("share a second" in n for n in plan.notes)


def test_long_gap_error_names_the_gap():
    with pytest.raises(LongGapError, match=r"10 s between seconds 4 and 14"):
        plan_inpainting([0, 4, 14, 18], [1, 2, 3, 4])


def test_long_gap_linear_policy_marks_seconds():
    plan = plan_inpainting([0, 4, 14, 18], [1, 2, 3, 4], long_gap="linear")
    assert plan.fallback_seconds == tuple(range(5, 14))
    assert sorted(by_second(plan)) == [1, 2, 3, 15, 16, 17]
    assert any("linear interpolation" in n for n in plan.notes)


def test_excluding_a_volume_can_create_a_long_gap():
    with pytest.raises(LongGapError):
        plan_inpainting([0, 5, 10, 15], [1, 2, 3, 4], usable=[True, False, True, True])


@pytest.mark.parametrize(
    ("times", "sums", "usable", "message"),
    [
        ([0, 4, 4, 8], [1, 1, 1, 1], None, "increase strictly"),
        ([0, 4, 8], [1, 1], None, "frame sums"),
        ([0, 4, 8], [1, 1, 1], [True, True], "usable flags"),
        ([0, 4, 8], [1, 1, 1], [False, True, False], "at least two usable"),
        ([0, float("nan"), 8], [1, 1, 1], None, "NaN"),
        ([], [], None, "non-empty"),
    ],
)
def test_bad_inputs_get_clear_errors(times, sums, usable, message):
    with pytest.raises(PlanError, match=message):
        plan_inpainting(times, sums, usable=usable)


def test_unknown_policy_is_rejected():
    with pytest.raises(PlanError, match="long-gap policy"):
        plan_inpainting([0, 4], [1, 1], long_gap="extrapolate")


def test_plan_index_maps_seconds_to_positions():
    plan = plan_inpainting([0, 4, 8], np.ones(3), usable=[False, True, True])
    assert plan.index(4) == 0 and plan.index(8) == 4


def test_the_fill_plan_says_what_fills_each_second():
    from model.planner import plan_seconds

    plan = plan_seconds([0.0, 3.6, 8.0, 20.0], usable=[True, False, True, True], long_gap="linear")
    kinds = {f.second: f.kind for f in plan.fills}
    assert [f.second for f in plan.fills] == list(range(21))
    assert kinds[0] == kinds[8] == kinds[20] == "acquired" and kinds[4] == "synthetic"
    assert {kinds[s] for s in range(9, 20)} == {"interpolated"}  # a 12 s gap: the long-gap policy
    assert {f.reason for f in plan.fills if f.kind == "interpolated"} == {"long gap"}
    assert plan.fills[4].replaces == 1  # the unusable volume at 3.6 s snapped to second 4, which the model fills
    assert [f.replaces for f in plan.fills if f.second != 4] == [None] * 20
    assert (plan.fills[4].left, plan.fills[4].right, plan.fills[4].weight) == (0, 2, 0.5)
    assert plan.fills[8].time_s == 8.0 and plan.fills[14].time_s == 14.0
    np.testing.assert_array_equal(plan.synthetic, [1 <= s <= 7 for s in range(21)])
    replaced = plan.model_replaced()
    assert not replaced.synthetic.any() and replaced.interpolated.sum() == 18
    assert {f.reason for f in replaced.fills if 1 <= f.second <= 7} == {"guardrail"}


def test_conditioning_follows_each_sequence_on_one_fill_plan():
    from model.planner import condition_targets, plan_seconds

    fill = plan_seconds([0, 4, 8, 12])
    early, late = condition_targets(fill, [9, 8, 1, 1]), condition_targets(fill, [1, 1, 8, 9])
    assert early.fill is fill and late.fill is fill
    assert [t.second for t in early.targets] == [t.second for t in late.targets] == list(fill.model_seconds)
    assert early.peak_second == 2 and late.peak_second == 10
    assert early.targets[0].scenario != late.targets[0].scenario
