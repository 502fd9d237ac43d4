"""`ctp-node evaluate`: the model vs linear interpolation vs the 1 s truth, per acquisition gap."""

from __future__ import annotations

from pathlib import Path

import typer

from ctp_node.cli.progress import stderr


def evaluate(
    # No -c: that is --config in every command that reads one (ctp_node/cli/common.py).
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Published-format or ctp-node checkpoint."),
    data: str = typer.Option("phantom", help="phantom (held-out simulated studies) or a folder of .npy sequences."),
    output: Path = typer.Option(Path("evaluation"), "--output", "-o", help="evaluation.json, evaluation.md, PNGs."),
    gaps: str = typer.Option("4,8", help="Acquisition gaps in seconds, comma-separated (issue 10's targets: 4,8)."),
    studies: int = typer.Option(5, help="Phantom studies (held out: seeds from --seed on)."),
    seed: int = typer.Option(10_000, help="First phantom seed (training draws other seeds)."),
    noise: float = typer.Option(6.0, help="Phantom noise, HU per voxel."),
    matrix: int | None = typer.Option(
        None, help="Phantom matrix (default: the family's: a 192 at 1.25 mm, b 256 at 0.9 mm; same field of view)."
    ),
    family: str = typer.Option(
        "a", help="Phantom family: a (ctp_node.phantom, the training family) or b (ctp_node.phantom.family_b)."
    ),
    static_ct: str = typer.Option(
        "auto",
        "--static-ct",
        help="Static series of real CT anatomy: auto (pydicom's head CT slices, with --data phantom), none, "
        "or comma-separated DICOM slices / series folders.",
    ),
    sampler: str | None = typer.Option(
        None, help="dpmpp_2m, ddim or ancestral (default: the checkpoint's recommendation, else dpmpp_2m)."
    ),
    steps: int | None = typer.Option(None, help="Sampler steps (default: the checkpoint's recommendation, else 20)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ..."),
    batch: int | None = typer.Option(None, "--batch", help="Targets per pass (default: as many as fit)."),
) -> None:
    """Issue 10's measurements: per-tissue offsets, tissue curves, perfusion maps, PSNR and AIF of the model's
    synthetic seconds vs linear interpolation and the 1 s acquisition, against the noise-free truth; static real CT."""
    from ctp_node.evaluation.phantom_study import PhantomEvalSettings, check_family, evaluate_npy, evaluate_phantom
    from ctp_node.evaluation.static_ct import evaluate_static
    from model import EngineSettings, Inpainter, load_denoiser
    from model.engine import choose_sampling

    try:
        gap_list = tuple(int(g) for g in gaps.split(","))
    except ValueError as exc:
        raise typer.BadParameter("--gaps must be whole seconds, e.g. 2,4,8") from exc
    if not gap_list or min(gap_list) < 2 or max(gap_list) > 8:
        raise typer.BadParameter("--gaps must lie in 2..8 s, the range the model was trained on")
    try:
        loaded = load_denoiser(checkpoint)
        sampling = choose_sampling(sampler, steps, loaded.info.recommended)
        engine = Inpainter(
            loaded,
            EngineSettings(sampler=sampling.sampler, steps=sampling.steps, batch_size=batch, long_gap="error"),
            device=device,
        )
    except (ValueError, RuntimeError) as exc:
        stderr.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    stderr.print(f"sampler {sampling.describe()}")
    if data == "phantom":
        try:
            check_family(family)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--family") from exc
    static_sources = _static_sources(static_ct if static_ct != "auto" or data == "phantom" else "none")
    if data == "phantom":
        settings = PhantomEvalSettings(
            gaps=gap_list, studies=studies, seed=seed, noise_hu=noise, matrix=matrix, family=family
        )
        report = evaluate_phantom(engine, settings, output, say=stderr.print)
    else:
        folder = Path(data)
        files = sorted(folder.glob("*.npy")) if folder.is_dir() else []
        if not files:
            raise typer.BadParameter(f"--data {data!r} is neither 'phantom' nor a folder of .npy sequences")
        report = evaluate_npy(engine, files, gap_list, output, say=stderr.print)
    for source in static_sources:
        for gap in gap_list:
            stderr.print(f"static real CT {source.name}, acquired every {gap} s")
            report.static_rows.append(evaluate_static(engine, source, gap))
    json_path, md_path = report.write(output)
    typer.echo(report.markdown())
    typer.echo(f"written: {json_path}, {md_path}" + (f", {len(report.figures)} figures" if report.figures else ""))


def _static_sources(spec: str) -> list:
    """The real CT volumes of ``--static-ct`` (``ctp_node.evaluation.static_ct``), read before the long phantom part."""
    from ctp_node.evaluation.static_ct import load_static_source, offline_head_cts

    if spec == "none":
        return []
    try:
        paths = offline_head_cts() if spec == "auto" else [Path(p) for p in spec.split(",") if p.strip()]
        return [load_static_source(p) for p in paths]
    except (OSError, ValueError) as exc:
        stderr.print(f"[red]error:[/red] --static-ct: {exc}")
        raise typer.Exit(2) from exc
