"""`ctp-node process` (a folder of DICOM files, offline) and `ctp-node reprocess` (a spooled series again)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ctp_node.cli.common import CONFIG_OPTION, find_job, load_settings_or_exit, peer_or_exit
from ctp_node.cli.progress import stderr, step_progress

if TYPE_CHECKING:
    from ctp_node.config import Destination, Settings

# Overrides of the configured [model] section, shared by process and reprocess.
CHECKPOINT_OPTION = typer.Option(None, "--checkpoint", help="Overrides model.checkpoint.")
STEPS_OPTION = typer.Option(
    None, "--steps", help="Overrides model.steps (unset: the checkpoint's recommendation, else 20)."
)
SAMPLER_OPTION = typer.Option(
    None, "--sampler", help="Overrides model.sampler (unset: the checkpoint's recommendation, else dpmpp_2m)."
)
DEVICE_OPTION = typer.Option(None, "--device", help="Overrides model.device.")


def _group_by_series(folder: Path) -> dict[str, list[Path]]:
    """DICOM files under ``folder`` by SeriesInstanceUID; non-DICOM files are listed and skipped."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    groups: dict[str, list[Path]] = {}
    skipped = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except (InvalidDicomError, OSError):
            skipped.append(path)
            continue
        uid = str(header.get("SeriesInstanceUID", ""))
        if not uid:
            skipped.append(path)
            continue
        groups.setdefault(uid, []).append(path)
    if skipped:
        stderr.print(
            f"[yellow]note:[/yellow] {len(skipped)} files are not DICOM series members and were skipped "
            f"(first: {skipped[0]})"
        )
    return groups


def _pipeline(config: Path | None, checkpoint: Path | None, steps: int | None, sampler: str | None, device: str | None):
    from ctp_node.series.pipeline import SeriesPipeline

    settings = load_settings_or_exit(config)
    model = settings.model.model_copy(
        update={k: v for k, v in {"checkpoint": checkpoint, "steps": steps, "sampler": sampler}.items() if v}
    )
    settings = settings.model_copy(update={"model": model})
    try:
        pipeline = SeriesPipeline.from_settings(settings, device)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        stderr.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    stderr.print(f"model {pipeline.recipe.checkpoint_id}: sampler {pipeline.sampling.describe()}", highlight=False)
    return settings, pipeline


def _report_guardrail(result) -> None:
    verdict = result.guardrail
    if verdict is None or verdict.policy == "off":
        return
    colour = "green" if verdict.passed else "bold yellow"
    stderr.print(f"  guardrail: [{colour}]{verdict.summary()}[/{colour}]", highlight=False)


def _destinations(settings: Settings, targets: list[str]) -> list[Destination]:
    """The ``--send`` targets as destinations (checked before any series is processed): a configured
    destination of either kind (DICOM or DICOMweb) by name, else HOST:PORT:AET."""
    from ctp_node.node.work.send_stage import find_destination

    try:
        return [find_destination(settings.destinations, target) for target in targets]
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--send") from exc


def _send(settings: Settings, result_dir: Path, destinations: list[Destination]) -> int:
    """Send a result as the worker's send stage does: every file it delivers (``ResultsLayout.files``: the
    synthetic series and each perfusion output), one attempt per destination (``send_attempt``); how
    many destinations did not take all of it. There is no job here, so no retry: run it again."""
    from ctp_node.node.shared.results import ResultsLayout
    from ctp_node.node.work.send_stage import send_attempt

    files = ResultsLayout.files(result_dir)
    failures = 0
    for destination in destinations:
        _, error = send_attempt(files, destination, settings.dicom.ae_title, dicom=settings.dicom)
        if error is None:
            stderr.print(f"sent {len(files)} instances to {destination.name}", highlight=False)
        else:
            stderr.print(f"[red]send to {destination.name} failed:[/red] {error}", highlight=False)
            failures += 1
    return failures


def process(
    folder: Path = typer.Argument(
        ..., exists=True, file_okay=False, help="A folder of DICOM files (searched recursively)."
    ),
    output: Path = typer.Option(
        Path("ctp-node-out"), "--output", "-o", help="Derived series go to OUTPUT/<series UID>/."
    ),
    send: list[str] = typer.Option(
        [],
        "--send",
        help="Send each result (the series and its perfusion outputs) to a configured destination (DICOM or "
        "DICOMweb) or HOST:PORT:AET (repeatable).",
    ),
    config: Path | None = CONFIG_OPTION,
    checkpoint: Path | None = CHECKPOINT_OPTION,
    steps: int | None = STEPS_OPTION,
    sampler: str | None = SAMPLER_OPTION,
    device: str | None = DEVICE_OPTION,
) -> None:
    """Inpaint every CTP series in a folder of DICOM files, offline, to a folder and/or destinations."""
    from ctp_node.errors import CTPInputError
    from ctp_node.series.pipeline import run_series

    groups = _group_by_series(folder)
    if not groups:
        stderr.print(f"[red]error:[/red] no DICOM series in {folder}")
        raise typer.Exit(2)
    settings, pipeline = _pipeline(config, checkpoint, steps, sampler, device)
    destinations = _destinations(settings, send)
    failures = 0
    for series_uid, files in groups.items():
        out_dir = output / series_uid
        try:
            with step_progress(f"series ...{series_uid[-12:]}", steps=pipeline.steps) as progress:
                result = run_series(pipeline, files, out_dir, progress=progress)
        except CTPInputError as exc:
            stderr.print(f"[red]{series_uid}: not processed:[/red] {type(exc).__name__}: {exc}")
            failures += 1
            continue
        stderr.print(
            f"{series_uid}: {result.derived.count} instances, {int(result.synthetic.sum())} synthetic seconds, "
            f"{result.seconds['total']:.1f} s -> {out_dir} (series {result.derived.series_uid})"
        )
        _report_guardrail(result)
        for note in result.notes:
            stderr.print(f"  note: {note}")
        failures += _send(settings, out_dir, destinations)
    if failures:
        raise typer.Exit(1)


STORE_DOWN_HINT = "check that storage.object_store's endpoint answers (and the node's log), then run this again"


def _open_spool_or_exit(settings: Settings):  # noqa: ANN202 - the local or object-store spool (imported lazily)
    """The spool as the node is configured (a folder or the object store), or exit 2 with one line when
    the bucket or the credentials are wrong."""
    from ctp_node.errors import ConfigError
    from ctp_node.node.shared.storage import open_object_store, open_spool

    try:
        return open_spool(settings.storage, open_object_store(settings.storage))
    except ConfigError as exc:
        stderr.print(f"[red]configuration error:[/red] {exc}")
        raise typer.Exit(2) from exc


def _pull(settings, store, spool, target: str, study: str | None, series_uid: str) -> None:
    from ctp_node.node.receive.retrieve import retrieve_series
    from ctp_node.node.shared.spool import InvalidUIDError

    if not study:
        raise typer.BadParameter("--from-pacs needs --study (the StudyInstanceUID of the series)")
    peer = peer_or_exit(settings, target)
    try:
        got = retrieve_series(peer, study, series_uid, spool, settings.dicom.ae_title)
    except (ConnectionError, InvalidUIDError) as exc:
        stderr.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    for _ in got.paths:
        store.record_instance(got.key.study_uid, got.key.series_uid, "C-GET")
    stderr.print(
        f"pulled {len(got.paths)} instances of {series_uid} from {target}"
        + (f" ({got.failed} failed)" if got.failed else "")
    )


def reprocess(
    ref: str = typer.Argument(..., help="Job id or series UID of a spooled series (a series UID with --from-pacs)."),
    from_pacs: str | None = typer.Option(
        None, "--from-pacs", help="Pull the series first with C-GET from this destination name or HOST:PORT:AET."
    ),
    study: str | None = typer.Option(None, "--study", help="StudyInstanceUID of the series (with --from-pacs)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write here instead of queueing a delivery."),
    config: Path | None = CONFIG_OPTION,
    checkpoint: Path | None = CHECKPOINT_OPTION,
    steps: int | None = STEPS_OPTION,
    sampler: str | None = SAMPLER_OPTION,
    device: str | None = DEVICE_OPTION,
) -> None:
    """Run a spooled series again, with other settings if given, to a folder (--output) or its destinations."""
    import shutil

    from ctp_node.errors import CTPInputError
    from ctp_node.node.shared.jobs import JobStore
    from ctp_node.node.shared.object_store import StoreUnavailable
    from ctp_node.node.shared.spool import SeriesKey
    from ctp_node.node.shared.storage import scratch_folder
    from ctp_node.series.pipeline import run_series

    if output is None and any(v is not None for v in (checkpoint, steps, sampler, device)):
        raise typer.BadParameter(
            "--checkpoint, --steps, --sampler and --device need --output: queued jobs use the workers' configured model"
        )
    settings = load_settings_or_exit(config)
    store = JobStore(settings.database_url)
    # The local folder or the object store, as the node is configured (a worker reads it the same way).
    spool = _open_spool_or_exit(settings)
    if from_pacs:
        _pull(settings, store, spool, from_pacs, study, ref)
    job = find_job(store, ref)
    key = SeriesKey(job.study_uid, job.series_uid)
    try:
        spooled = spool.objects(key)
    except StoreUnavailable as exc:
        stderr.print(f"[red]error:[/red] {exc}; {STORE_DOWN_HINT}")
        raise typer.Exit(1) from exc
    if not spooled:
        stderr.print(
            f"[red]error:[/red] the spool holds no instances of {job.series_uid} (rotated or never kept); "
            "pull it again with --from-pacs NAME --study STUDY_UID"
        )
        raise typer.Exit(2)
    if output is None:
        store.retry(job.id)
        typer.echo(f"job {job.id} queued again; a worker with the configured model will process and send it")
        return
    settings, pipeline = _pipeline(config, checkpoint, steps, sampler, device)
    download = scratch_folder(settings.storage.scratch_dir, f"reprocess-{job.id}")  # object store only
    try:
        files = spool.fetch(key, download)
        with step_progress(f"series ...{job.series_uid[-12:]}", steps=pipeline.steps) as progress:
            result = run_series(pipeline, files, output / job.series_uid, progress=progress)
    except CTPInputError as exc:
        stderr.print(f"[red]not processed:[/red] {type(exc).__name__}: {exc}")
        raise typer.Exit(1) from exc
    except StoreUnavailable as exc:
        stderr.print(f"[red]error:[/red] {exc}; {STORE_DOWN_HINT}")
        raise typer.Exit(1) from exc
    finally:
        shutil.rmtree(download, ignore_errors=True)
    _report_guardrail(result)
    typer.echo(f"{result.derived.count} instances -> {output / job.series_uid}")
