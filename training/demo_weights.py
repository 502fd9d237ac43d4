"""Train demo weights in a fixed wall-clock budget: a short measured calibration, then the run.

    ctp-node train --config training/configs/phantom_cpu.toml --minutes 75
    ctp-node train --config training/configs/phantom_small.toml --minutes 10  # GPU

The calibration trains ``--calibration-steps`` steps of the configuration in a scratch folder and
times them (the first steps, which warm up allocators and kernels, are left out); the run then gets
``optim.iterations = budget / (seconds per step x overhead)``, the overhead covering validation,
preview and checkpoint writes. Learning-rate milestones are fractions of the iterations, so the
schedule stretches with the budget. At the end the EMA weights are exported in bf16
(``<output>/model_ema_bf16.pt``); copy them to ``model/weights/demo.pt`` after evaluating them.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from training.config import TrainConfig
from training.datasets import StudySource
from training.state import TrainState
from training.trainer import train

WARM_UP_STEPS = 3
DEFAULT_CALIBRATION_STEPS = 12
DEFAULT_OVERHEAD = 1.08  # allowance for validation, previews and checkpoint writes
PLAN_NAME = "demo_weights_run.json"


def measure_seconds_per_step(config: TrainConfig, steps: int, studies: StudySource | None = None) -> float:
    """Median wall-clock seconds per optimiser step over ``steps`` steps after the warm-up."""
    stamps: list[float] = []
    with tempfile.TemporaryDirectory(prefix="ctp-node-calibration-") as scratch:
        calibration = config.with_overrides(
            {
                "optim.iterations": steps + WARM_UP_STEPS,
                "runtime.output": Path(scratch),
                "runtime.progress": False,
                "runtime.val_every": 0,
                "runtime.sample_every": 0,
                "runtime.checkpoint_every": steps + WARM_UP_STEPS,
            }
        )

        def stamp(state: TrainState) -> None:
            stamps.append(time.perf_counter())

        train(calibration, callback=stamp, studies=studies)
    intervals = [b - a for a, b in zip(stamps[WARM_UP_STEPS - 1 :], stamps[WARM_UP_STEPS:])]
    return statistics.median(intervals)


def train_in_budget(
    config: TrainConfig,
    minutes: float,
    *,
    calibration_steps: int = DEFAULT_CALIBRATION_STEPS,
    overhead: float = DEFAULT_OVERHEAD,
    studies: StudySource | None = None,
    label: str = "",
    announce: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Calibrate, then train ``budget / (seconds per step x overhead)`` iterations of ``config``.

    Returns the plan and its outcome, also written to ``<output>/demo_weights_run.json``; ``label``
    names the configuration there (its file); ``announce(plan)`` hears the plan before the run starts.
    """
    if minutes <= 0 or calibration_steps < 1 or overhead < 1:
        raise ValueError(
            "need minutes > 0, calibration steps >= 1 and overhead >= 1; "
            f"got {minutes}, {calibration_steps}, {overhead}"
        )
    seconds = measure_seconds_per_step(config, calibration_steps, studies)
    iterations = max(1, int(minutes * 60 / (seconds * overhead)))
    config = config.with_overrides({"optim.iterations": iterations})
    output = config.runtime.output
    output.mkdir(parents=True, exist_ok=True)
    plan: dict[str, Any] = {
        "config": label,
        "budget_minutes": minutes,
        "calibration_seconds_per_step": seconds,
        "iterations": iterations,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if announce is not None:
        announce(dict(plan))
    started = time.perf_counter()
    result = train(config, studies=studies)
    plan.update(
        finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        wall_minutes=(time.perf_counter() - started) / 60,
        steps=result.step,
        stopped=result.stopped,
        last_loss=result.last_loss,
        export=str(result.export) if result.export else None,
    )
    (output / PLAN_NAME).write_text(json.dumps(plan, indent=2) + "\n", encoding="utf-8")
    return plan
