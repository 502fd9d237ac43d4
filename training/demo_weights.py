"""Train demo weights in a fixed wall-clock budget: a short measured calibration, then the run.

    python -m training.demo_weights --config training/configs/phantom_cpu.toml --minutes 75
    python -m training.demo_weights --config training/configs/phantom_small.toml --minutes 10  # GPU

The calibration trains ``--calibration-steps`` steps of the configuration in a scratch folder and
times them (the first steps, which warm up allocators and kernels, are left out); the run then gets
``optim.iterations = budget / (seconds per step x overhead)``, the overhead covering validation,
preview and checkpoint writes. Learning-rate milestones are fractions of the iterations, so the
schedule stretches with the budget. At the end the EMA weights are exported in bf16
(``<output>/model_ema_bf16.pt``); copy them to ``model/weights/demo.pt`` after evaluating them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from training.config import load_config
from training.state import TrainState
from training.trainer import train

WARM_UP_STEPS = 3


def measure_seconds_per_step(config_path: Path, steps: int) -> float:
    """Median wall-clock seconds per optimiser step over ``steps`` steps after the warm-up."""
    config = load_config(config_path)
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

        train(calibration, callback=stamp)
    intervals = [b - a for a, b in zip(stamps[WARM_UP_STEPS - 1 :], stamps[WARM_UP_STEPS:])]
    return statistics.median(intervals)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="training configuration (TOML)")
    parser.add_argument("--minutes", type=float, required=True, help="wall-clock budget of the run")
    parser.add_argument("--calibration-steps", type=int, default=12)
    parser.add_argument("--overhead", type=float, default=1.08, help="allowance for validation and checkpoints")
    parser.add_argument("--output", type=Path, default=None, help="run folder (default: the configuration's)")
    args = parser.parse_args(argv)

    seconds = measure_seconds_per_step(args.config, args.calibration_steps)
    iterations = max(1, int(args.minutes * 60 / (seconds * args.overhead)))
    config = load_config(args.config)
    overrides: dict[str, object] = {"optim.iterations": iterations}
    if args.output is not None:
        overrides["runtime.output"] = args.output
    config = config.with_overrides(overrides)
    output = config.runtime.output
    output.mkdir(parents=True, exist_ok=True)
    plan = {
        "config": str(args.config),
        "budget_minutes": args.minutes,
        "calibration_seconds_per_step": seconds,
        "iterations": iterations,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(json.dumps(plan), flush=True)
    started = time.perf_counter()
    result = train(config)
    plan.update(
        finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        wall_minutes=(time.perf_counter() - started) / 60,
        steps=result.step,
        stopped=result.stopped,
        last_loss=result.last_loss,
        export=str(result.export) if result.export else None,
    )
    (output / "demo_weights_run.json").write_text(json.dumps(plan, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(plan), flush=True)


if __name__ == "__main__":
    main()
