"""`ctp-node demo`: a node, a phantom study sent to it every 4 s, the synthetic 1 s series, perfusion maps."""

from __future__ import annotations

from pathlib import Path

import typer

from ctp_node.cli.progress import stderr, step_progress


def _random_weights(path: Path) -> Path:
    import torch

    from model.checkpoint import SamplerRecommendation, save_checkpoint
    from model.unet import UNet3D, UNetConfig

    torch.manual_seed(0)
    net = UNet3D(UNetConfig(model_channels=8, channel_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=4))
    # Nothing to tune on a random network: the cheapest sampler keeps the stand-in run short.
    return save_checkpoint(path, net, recommended=SamplerRecommendation("ddim", 2))


def demo(
    output: Path = typer.Option(Path("ctp-node-demo"), "--output", "-o", help="Everything the demo writes."),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="Weights to use (default: the shipped demo weights when present)."
    ),
    sampler: str | None = typer.Option(
        None, help="ddim, dpmpp_2m or ancestral (default: the checkpoint's recommendation, else dpmpp_2m)."
    ),
    steps: int | None = typer.Option(None, help="Sampler steps (default: the checkpoint's recommendation, else 20)."),
    matrix: int = typer.Option(128, help="Phantom matrix (128 keeps the CPU run short; 512 is realistic)."),
) -> None:
    """Run the main job end to end on embedded defaults (research use only)."""
    from ctp_node.demo import run_demo
    from ctp_node.logs import setup_logging
    from model.checkpoint import DEMO_WEIGHTS, CheckpointError, read_checkpoint
    from model.engine import choose_sampling

    setup_logging("WARNING")
    if checkpoint is None and DEMO_WEIGHTS.exists():
        checkpoint = DEMO_WEIGHTS
    if checkpoint is None:
        checkpoint = _random_weights(output / "random-weights.pt")
        stderr.print(
            "[bold yellow]No trained weights: the demo falls back to a RANDOMLY INITIALISED network.[/bold yellow] "
            "Every step of the node runs for real, but the synthetic seconds are NOT the model's output and their "
            "perfusion maps mean nothing. Give --checkpoint with the published or phantom-trained weights."
        )
    try:
        sampling = choose_sampling(sampler, steps, read_checkpoint(checkpoint).recommended)
    except CheckpointError as exc:
        stderr.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    stderr.print(f"weights {checkpoint}: sampler {sampling.describe()}")
    with step_progress("inpainting", steps=sampling.steps) as progress:
        result = run_demo(
            output, checkpoint, steps=sampling.steps, sampler=sampling.sampler, matrix=matrix, say=stderr.print,
            progress=progress,
        )  # fmt: skip
    typer.echo(f"synthetic series {result.derived_series_uid}: {result.derived_files} instances in {result.pacs_dir}")
    typer.echo(f"perfusion figures: {', '.join(str(f) for f in result.figures)}; summary: {output / 'summary.json'}")
