"""`ctp-node bench`: the published sampling loop against this engine, on this machine."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ctp_node.cli.progress import stderr


def bench(
    output: Path = typer.Option(Path("bench.json"), "--output", "-o", help="Where to write the JSON results."),
    device: str = typer.Option("auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1, ..."),
    network: str | None = typer.Option(
        None, help="published (104 M, default on GPU), small (13.5 M) or tiny (default on CPU)."
    ),
    volume: str | None = typer.Option(None, help="Volume D x H x W, e.g. 8x192x192 (default on GPU) or 8x64x64 (CPU)."),
    steps: int | None = typer.Option(None, help="Engine sampler steps (default: the engine's default on GPU)."),
    sampler: str | None = typer.Option(None, help="Engine sampler (default dpmpp_2m)."),
    batch: int | None = typer.Option(None, "--batch", help="Engine batch (default: as many as fit)."),
    compile_net: bool | None = typer.Option(
        None, "--compile/--no-compile", help="torch.compile the engine's network (default: on for CUDA)."
    ),
    published_steps: int | None = typer.Option(None, help="Warm steps timed for the published loop."),
    warm_runs: int | None = typer.Option(None, help="Warm runs of the whole study (median reported)."),
) -> None:
    """Time the published per-volume loop and this engine on the 60 s / 4 s reference study."""
    from dataclasses import replace

    from rich.table import Table

    from model.benchmark import NETWORKS, BenchSettings, run_benchmark
    from model.device import choose_device

    dev = choose_device(device)
    settings = BenchSettings.for_device(dev)
    engine = settings.engine
    if network is not None:
        if network not in NETWORKS:
            raise typer.BadParameter(f"--network must be one of {', '.join(NETWORKS)}")
        settings = replace(settings, network=network)
    if volume is not None:
        try:
            shape = tuple(int(v) for v in volume.lower().split("x"))
        except ValueError as exc:
            raise typer.BadParameter("--volume must look like 8x192x192") from exc
        if len(shape) != 3 or min(shape) < 1:
            raise typer.BadParameter("--volume must look like 8x192x192")
        settings = replace(settings, volume_shape=shape)
    engine = replace(
        engine,
        steps=steps if steps is not None else engine.steps,
        sampler=sampler or engine.sampler,
        batch_size=batch if batch is not None else engine.batch_size,
        compile=compile_net,
    )
    settings = replace(
        settings,
        engine=engine,
        published_steps_timed=published_steps or settings.published_steps_timed,
        warm_runs=warm_runs or settings.warm_runs,
    )
    if dev.type != "cuda":
        stderr.print(
            "[yellow]No GPU: CPU timings of a reduced configuration, not comparable with GPU targets.[/yellow]"
        )
    result = run_benchmark(settings, dev, log=lambda msg: stderr.print(msg))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))

    table = Table(
        title=f"ctp-node bench on {result['device']} ({result['network']} network, "
        f"{'x'.join(map(str, result['volume_shape']))})"
    )
    for col in ("path", "ms / volume-step", "TFLOP/s", "study (s)", "note"):
        table.add_column(col)
    pub, eng = result["published_loop"], result["engine"]
    table.add_row(
        "(a) published loop, fp32, batch 1",
        f"{pub['ms_per_step']:.2f}",
        f"{pub['tflops']:.2f}",
        f"{pub['study_estimate_s']:.1f}",
        pub["note"],
    )
    table.add_row(
        f"(b) engine, {engine.sampler} {engine.steps} steps, batch {result['batch_size']}",
        f"{eng['ms_per_volume_step']:.2f}",
        f"{eng['tflops']:.2f}",
        f"{eng['study_s']:.2f}",
        f"one-off cost {eng['one_off_cost_s']:.1f} s (cold run {eng['cold_run_s']:.1f} s)",
    )
    typer.echo("")
    stderr.print(table)
    typer.echo(
        f"speed-up per volume-step {result['speedup_per_volume_step']:.1f}x, per study "
        f"{result['speedup_study']:.1f}x; peak memory {result['peak_memory_gib']:.2f} GiB "
        f"({result['peak_memory_kind']}); JSON: {output}"
    )
