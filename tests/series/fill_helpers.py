"""Plans of what fills each second, for tests that hand the later stages a chosen mix of kinds."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from model.planner import FillPlan, plan_seconds


def fill_for(times_s, synthetic=None, usable=None) -> FillPlan:
    """The engine's plan for ``times_s`` (long gaps interpolated); ``synthetic``: (T1,) bool to choose
    which non-acquired seconds the model fills instead (the others interpolated)."""
    plan = plan_seconds(np.asarray(times_s, dtype=np.float64), usable=usable, long_gap="linear")
    if synthetic is None:
        return plan
    synthetic = np.asarray(synthetic, dtype=bool)
    assert synthetic.shape == (len(plan.fills),), f"{synthetic.shape} for {len(plan.fills)} seconds"
    fills = tuple(
        f
        if f.kind == "acquired"
        else replace(f, kind="synthetic" if s else "interpolated", reason="" if s else "long gap")
        for f, s in zip(plan.fills, synthetic)
    )
    return replace(plan, fills=fills)
