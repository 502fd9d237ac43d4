"""Linear interpolation in time: the reference every model result is compared with.

It uses the same 1 s grid and snapping rule as the model's planner (model.planner), so a baseline
and a model sequence of the same study line up second by second.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from model.planner import FillPlan, InpaintPlan, plan_seconds


def interpolate_seconds(plan: FillPlan | InpaintPlan, known: np.ndarray, seconds: Sequence[int]) -> np.ndarray:
    """Linear interpolation of the given grid seconds between the plan's bracketing known volumes
    (``SecondFill.interpolate``: the formula of every stage); acquired seconds are their volume.

    ``known``: the input volumes (N, ...) in the order of the plan's ``input_second``.
    """
    fill = plan.fill if isinstance(plan, InpaintPlan) else plan
    out = np.empty((len(seconds), *known.shape[1:]), dtype=np.float32)
    for k, sec in enumerate(seconds):
        src = fill.fills[fill.index(sec)]
        out[k] = known[src.left] if src.kind == "acquired" else src.interpolate(known)
    return out


def linear_inpaint(
    known: np.ndarray,
    times_s: Sequence[float] | np.ndarray,
    *,
    usable: Sequence[bool] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fill every missing second by linear interpolation between the acquired volumes.

    ``known``: (N, ...) any array per time point (HU or model space); ``times_s``: (N,) seconds.
    Returns the 1 s sequence (T1, ...), its absolute times (T1,), and a mask of the interpolated
    seconds (T1,). There is no gap limit: interpolation has no trained range.
    """
    known = np.asarray(known)
    if known.shape[0] != len(times_s):
        raise ValueError(f"got {known.shape[0]} volumes but {len(times_s)} times")
    plan = plan_seconds(times_s, usable=usable, max_tr=np.iinfo(np.int32).max, long_gap="error")
    sequence = interpolate_seconds(plan, known, [int(s) for s in plan.seconds])
    synthetic = ~np.isin(plan.seconds, plan.known_seconds)
    return sequence, plan.times_s, synthetic
