"""`ctp-node infer`: the authors' offline path on their array layout.

Input: `.npy` arrays shaped (8, 192, 192, T), windowed HU 0..80, skull-stripped, one file per
sequence (or a folder of them). Output per input: `<stem>_1s.npy` (8, 192, 192, T1) in 0..80 HU and
a JSON sidecar saying which seconds are acquired, synthetic or interpolated, and how.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ctp_node.cli.progress import stderr, step_progress
from ctp_node.files import atomic_write


def _parse_times(text: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError as exc:
        raise typer.BadParameter(f"--times must be comma-separated seconds, e.g. 0,4,8.5: {exc}") from exc


def _parse_indices(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError as exc:
        raise typer.BadParameter(f"--unusable must be comma-separated volume indices, e.g. 3,7: {exc}") from exc


def _inputs(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.glob("*.npy") if not p.stem.endswith(("_1s", "_spread")))
        if not files:
            raise typer.BadParameter(f"no .npy sequences in {path}")
        return files
    if not path.exists():
        raise typer.BadParameter(f"{path} does not exist")
    return [path]


def infer(
    input_path: Path = typer.Argument(..., help="A .npy sequence (8 x 192 x 192 x T, 0..80 HU) or a folder of them."),
    output: Path = typer.Option(Path("out"), "--output", "-o", help="Folder for <stem>_1s.npy and <stem>_1s.json."),
    checkpoint: Path = typer.Option(
        ...,
        "--checkpoint",
        envvar="CTP_NODE_CHECKPOINT",
        help="Published-format or ctp-node checkpoint.",
    ),
    gap: float | None = typer.Option(None, "--gap", help="The file holds volumes acquired every GAP seconds."),
    times: str | None = typer.Option(
        None, "--times", help="Acquisition time of each volume in the file, e.g. 0,1.5,3,6."
    ),
    from_full: int | None = typer.Option(
        None,
        "--from-full",
        help="The file is a 1 s sequence: keep every N-th volume as known and inpaint the rest "
        "(the authors' evaluation protocol).",
    ),
    unusable: str | None = typer.Option(None, "--unusable", help="Volume indices to treat as missing, e.g. 3,7."),
    sampler: str | None = typer.Option(
        None,
        help="dpmpp_2m, ddim, or ancestral (the published sampler); default: the checkpoint's recommendation, "
        "else dpmpp_2m.",
    ),
    steps: int | None = typer.Option(
        None,
        help="Sampler steps (the published ancestral sampler uses 1500); default: the checkpoint's "
        "recommendation, else 20.",
    ),
    spacing: str = typer.Option("logsnr", help="Noise-level spacing of fast samplers: logsnr, karras, uniform."),
    batch: int | None = typer.Option(None, "--batch", help="Targets per GPU pass (default: as many as fit)."),
    seed: int = typer.Option(0, help="Seed of the initial noise (per target second, independent of batching)."),
    samples: int = typer.Option(1, help="Draws per target; >1 also writes the per-voxel spread (_spread.npy)."),
    device: str = typer.Option("auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1, ..."),
    precision: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), bf16 or fp32."),
    compile_net: bool | None = typer.Option(
        None, "--compile/--no-compile", help="torch.compile the network (default: on for CUDA, off for CPU)."
    ),
    long_gap: str = typer.Option("error", help="Gaps over 8 s: error, or linear (interpolated and marked)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Inpaint every missing second of the authors' .npy sequences to a 1 s series."""
    import numpy as np

    from model import CheckpointError, EngineSettings, Inpainter, PlanError, load_denoiser
    from model.engine import choose_sampling
    from model.window import from_model_space, to_model_space

    chosen = [
        name for name, value in (("--gap", gap), ("--times", times), ("--from-full", from_full)) if value is not None
    ]
    if len(chosen) != 1:
        raise typer.BadParameter("give exactly one of --gap, --times or --from-full")
    if gap is not None and gap <= 0:
        raise typer.BadParameter(f"--gap must be positive seconds, got {gap}")
    if from_full is not None and from_full < 2:
        raise typer.BadParameter(f"--from-full must be >= 2 (every N-th second is kept), got {from_full}")
    try:
        loaded = load_denoiser(checkpoint)
        sampling = choose_sampling(sampler, steps, loaded.info.recommended)
        settings = EngineSettings(
            sampler=sampling.sampler,
            steps=sampling.steps,
            spacing=spacing,
            batch_size=batch,
            precision=precision,  # type: ignore[arg-type]
            compile=compile_net,
            seed=seed,
            n_samples=samples,
            long_gap=long_gap,  # type: ignore[arg-type]
        )
        engine = Inpainter(loaded, settings, device=device)
    except (ValueError, RuntimeError) as exc:
        stderr.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    stderr.print(
        f"checkpoint {checkpoint} ({loaded.info.format} format), device {engine.device}, sampler {sampling.describe()}"
    )
    output.mkdir(parents=True, exist_ok=True)
    for path in _inputs(input_path):
        array = np.load(path, mmap_mode="r")
        if array.ndim != 4:
            raise typer.BadParameter(f"{path}: expected (8, 192, 192, T), got shape {array.shape}")
        volumes = np.moveaxis(np.asarray(array, dtype=np.float32), -1, 0)  # (T, D, H, W)
        if from_full is not None:
            keep = np.arange(0, volumes.shape[0], from_full)
            volumes, t_s = volumes[keep], keep.astype(float)
        elif gap is not None:
            t_s = np.arange(volumes.shape[0]) * gap
        else:
            t_s = np.asarray(_parse_times(times or ""))
        if len(t_s) != volumes.shape[0]:
            raise typer.BadParameter(f"{path}: {volumes.shape[0]} volumes but {len(t_s)} times")
        if volumes.min() < 0 or volumes.max() > 80:
            stderr.print(
                f"[yellow]note:[/yellow] {path.name} has values outside 0..80 HU; they are clipped to the window"
            )
        usable = np.ones(len(t_s), bool)
        for idx in _parse_indices(unusable):
            if not 0 <= idx < len(t_s):
                raise typer.BadParameter(f"--unusable index {idx} is outside 0..{len(t_s) - 1}")
            usable[idx] = False
        try:
            with step_progress(f"{path.name}", enabled=not quiet, steps=settings.steps) as progress:
                result = engine.inpaint(to_model_space(volumes), t_s, usable=usable, progress=progress)
        except (PlanError, CheckpointError, ValueError) as exc:
            stderr.print(f"[red]error:[/red] {path.name}: {exc}")
            raise typer.Exit(2) from exc
        stem = output / f"{path.stem}_1s"
        _atomic_save(stem.with_suffix(".npy"), np.moveaxis(from_model_space(result.sequence), 0, -1))
        if result.spread is not None:
            _atomic_save(output / f"{path.stem}_spread.npy", np.moveaxis(result.spread * 40.0, 0, -1))
        sidecar = {
            "input": str(path),
            "times_s": result.times_s.tolist(),
            "synthetic": result.synthetic.tolist(),
            "interpolated": result.fallback.tolist(),
            "plan_notes": list(result.plan.notes),
            "max_snap_error_s": result.plan.max_snap_error_s,
            "peak_second": result.plan.peak_second,
            "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__},
            "checkpoint": loaded.info.to_dict(),
            "device": str(engine.device),
            "seconds_total": result.timings_s["total"],
            "research_use_only": True,
        }
        stem.with_suffix(".json").write_text(json.dumps(sidecar, indent=2))
        n_syn = int(result.synthetic.sum())
        stderr.print(
            f"{path.name}: {len(result.times_s)} s at 1 s, {n_syn} synthetic, {int(result.fallback.sum())} "
            f"interpolated, in {result.timings_s['total']:.1f} s -> {stem.with_suffix('.npy')}"
        )


def _atomic_save(path: Path, array: object) -> None:
    import numpy as np

    with atomic_write(path) as fh:
        np.save(fh, array)
