"""`ctp-node evaluate`: the model vs linear interpolation vs the 1 s truth, per acquisition gap."""

from __future__ import annotations

from pathlib import Path

import typer

from ctp_node.cli.progress import stderr


def evaluate(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="Published-format or ctp-node checkpoint."),
    data: str = typer.Option("phantom", help="phantom (held-out simulated studies) or a folder of .npy sequences."),
    output: Path = typer.Option(Path("evaluation"), "--output", "-o", help="evaluation.json, evaluation.md, PNGs."),
    gaps: str = typer.Option("2,4,8", help="Acquisition gaps in seconds, comma-separated."),
    studies: int = typer.Option(3, help="Phantom studies (held out: seeds from --seed on)."),
    seed: int = typer.Option(10_000, help="First phantom seed (training draws other seeds)."),
    noise: float = typer.Option(6.0, help="Phantom noise, HU per voxel."),
    matrix: int = typer.Option(192, help="Phantom matrix."),
    sampler: str = typer.Option("dpmpp_2m", help="dpmpp_2m, ddim or ancestral."),
    steps: int = typer.Option(20, help="Sampler steps."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ..."),
    batch: int | None = typer.Option(None, "--batch", help="Targets per pass (default: as many as fit)."),
) -> None:
    """Masked PSNR/SSIM of synthetic volumes and perfusion agreement, model against linear interpolation."""
    from model import EngineSettings, Inpainter, load_denoiser
    from training.evaluation import PhantomEvalSettings, evaluate_npy, evaluate_phantom

    try:
        gap_list = tuple(int(g) for g in gaps.split(","))
    except ValueError as exc:
        raise typer.BadParameter("--gaps must be whole seconds, e.g. 2,4,8") from exc
    if not gap_list or min(gap_list) < 2 or max(gap_list) > 8:
        raise typer.BadParameter("--gaps must lie in 2..8 s, the range the model was trained on")
    try:
        engine = Inpainter(
            load_denoiser(checkpoint),
            EngineSettings(sampler=sampler, steps=steps, batch_size=batch, long_gap="error"),
            device=device,
        )
    except (ValueError, RuntimeError) as exc:
        stderr.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    if data == "phantom":
        settings = PhantomEvalSettings(gaps=gap_list, studies=studies, seed=seed, noise_hu=noise, matrix=matrix)
        report = evaluate_phantom(engine, settings, output, say=stderr.print)
    else:
        folder = Path(data)
        files = sorted(folder.glob("*.npy")) if folder.is_dir() else []
        if not files:
            raise typer.BadParameter(f"--data {data!r} is neither 'phantom' nor a folder of .npy sequences")
        report = evaluate_npy(engine, files, gap_list, output, say=stderr.print)
    json_path, md_path = report.write(output)
    typer.echo(report.markdown())
    typer.echo(f"written: {json_path}, {md_path}" + (f", {len(report.figures)} figures" if report.figures else ""))
