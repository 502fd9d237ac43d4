"""`ctp-node train`: train (or fine-tune, or resume) the denoiser from a TOML configuration.

Several GPUs: ``torchrun --nproc_per_node N --no-python ctp-node train --config run.toml``.
``--minutes M``: a wall-clock budget instead of ``optim.iterations`` (how the demo weights were
trained; training/demo_weights.py). ``data.kind = "phantom"`` draws its studies from the digital
phantom (ctp_node/phantom/training_source.py): the trainer itself knows no phantom.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from ctp_node.cli.progress import stderr


def train(
    config: Path | None = typer.Option(
        None, "--config", "-c", help="Training configuration (TOML; see training/configs/). Optional with --resume."
    ),
    resume: Path | None = typer.Option(
        None, "--resume", help="Continue a run from its checkpoint (same step, optimiser and EMA state)."
    ),
    finetune: Path | None = typer.Option(
        None, "--finetune", help="Start from these weights (published format or ctp-node), fresh optimiser."
    ),
    iterations: int | None = typer.Option(None, "--iterations", help="Override optim.iterations."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Override optim.batch_size (global batch)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Override runtime.output (run folder)."),
    device: str | None = typer.Option(None, "--device", help="Override runtime.device: auto, cpu, cuda, cuda:1."),
    num_workers: int | None = typer.Option(None, "--num-workers", help="Override runtime.num_workers."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    minutes: float | None = typer.Option(
        None, "--minutes", min=0.001, help="Wall-clock budget: time a few steps, then set optim.iterations to fit."
    ),
    calibration_steps: int = typer.Option(12, "--calibration-steps", min=1, help="Steps timed with --minutes."),
    overhead: float = typer.Option(
        1.08, "--overhead", min=1.0, help="With --minutes: allowance for validation and checkpoints."
    ),
) -> None:
    """Train the conditional diffusion model (the published recipe unless configured otherwise)."""
    from rich.markup import escape

    from ctp_node.phantom.training_source import PhantomStudies
    from model.checkpoint import CheckpointError
    from training.config import TrainingConfigError, load_config
    from training.datasets import DataError
    from training.demo_weights import train_in_budget
    from training.state import config_from_checkpoint
    from training.trainer import TrainingError
    from training.trainer import train as run_training

    overrides: dict[str, Any] = {
        key: value
        for key, value in {
            "optim.iterations": iterations,
            "optim.batch_size": batch_size,
            "runtime.output": output,
            "runtime.device": device,
            "runtime.num_workers": num_workers,
            "init.resume": resume,
            "init.weights": finetune,
        }.items()
        if value is not None
    }
    if quiet:
        overrides["runtime.progress"] = False
    if minutes is not None and (resume is not None or iterations is not None):
        raise typer.BadParameter("--minutes plans the iterations of a fresh run: leave out --resume and --iterations")
    try:
        if config is not None:
            settings = load_config(config)
        elif resume is not None:
            settings = config_from_checkpoint(resume)
        else:
            raise typer.BadParameter("give --config (or --resume to continue a run with its stored configuration)")
        if resume is not None:
            overrides.setdefault("init.weights", None)
        settings = settings.with_overrides(overrides)
        studies = PhantomStudies(settings.data.phantom) if settings.data.kind == "phantom" else None
        if minutes is not None:
            plan = train_in_budget(
                settings,
                minutes,
                calibration_steps=calibration_steps,
                overhead=overhead,
                studies=studies,
                label=str(config),
                announce=lambda plan: typer.echo(json.dumps(plan)),
            )
            typer.echo(json.dumps(plan))
            return
        result = run_training(settings, studies=studies)
    except (TrainingConfigError, DataError, CheckpointError, TrainingError) as exc:
        stderr.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from exc
    if result.checkpoint is None:
        return  # ranks other than 0 write nothing and say nothing
    if result.stopped:
        stderr.print(
            f"stopped at step {result.step}; checkpoint {result.checkpoint}. Resume with:\n"
            f"  ctp-node train --resume {result.checkpoint}",
            soft_wrap=True,
        )
        return
    loss = "n/a" if result.last_loss is None else f"{result.last_loss:.4f}"
    stderr.print(
        f"done: {result.step} steps, last loss {loss}; checkpoint {result.checkpoint}, "
        f"inference weights {result.export}",
        soft_wrap=True,
    )
