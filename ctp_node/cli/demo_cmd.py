"""`ctp-node demo`: a node, a phantom study sent to it every 4 s, the synthetic 1 s series, perfusion maps."""

from __future__ import annotations

from pathlib import Path

import typer

from ctp_node.cli.progress import stderr, step_progress


def _random_weights(path: Path) -> Path:
    import torch

    from model.checkpoint import save_checkpoint
    from model.unet import UNet3D, UNetConfig

    torch.manual_seed(0)
    net = UNet3D(UNetConfig(model_channels=8, channel_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=4))
    return save_checkpoint(path, net)


def demo(
    output: Path = typer.Option(Path("ctp-node-demo"), "--output", "-o", help="Everything the demo writes."),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", "-c", help="Weights to use (default: the shipped demo weights when present)."
    ),
    sampler: str = typer.Option("ddim", help="ddim, dpmpp_2m or ancestral (docs/benchmarks.md: sampler tuning)."),
    steps: int = typer.Option(2, help="Sampler steps (chosen for the demo weights from the measured curve)."),
    matrix: int = typer.Option(128, help="Phantom matrix (128 keeps the CPU run short; 512 is realistic)."),
) -> None:
    """Run the main job end to end on embedded defaults (research use only)."""
    from ctp_node.demo import run_demo
    from ctp_node.logs import setup_logging
    from model.checkpoint import DEMO_WEIGHTS

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
    with step_progress("inpainting") as progress:
        result = run_demo(
            output, checkpoint, steps=steps, sampler=sampler, matrix=matrix, say=stderr.print, progress=progress
        )
    typer.echo(f"synthetic series {result.derived_series_uid}: {result.derived_files} instances in {result.pacs_dir}")
    typer.echo(f"perfusion figures: {', '.join(str(f) for f in result.figures)}; summary: {output / 'summary.json'}")
