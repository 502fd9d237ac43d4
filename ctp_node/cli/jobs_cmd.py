"""`ctp-node jobs`: list, show, retry and re-send series jobs; `ctp-node echo`: check destinations."""

from __future__ import annotations

from pathlib import Path

import typer

from ctp_node.cli.common import CONFIG_OPTION, find_job, load_settings_or_exit, open_job_store, peer_or_exit
from ctp_node.cli.progress import stderr

jobs_app = typer.Typer(help="List, show, retry and re-send series jobs.", no_args_is_help=True)


@jobs_app.command("list")
def list_jobs(
    config: Path | None = CONFIG_OPTION,
    state: list[str] = typer.Option([], "--state", help="Only these states (repeatable)."),
    limit: int = typer.Option(50, help="Newest first, at most this many."),
) -> None:
    """One line per series: id, state, distinct instances, received, series UID, error or warning."""
    from rich.table import Table

    from ctp_node.node.shared.jobs_read import State

    try:
        states = [State(s) for s in state]
    except ValueError as exc:
        raise typer.BadParameter(f"--state must be one of {', '.join(s.value for s in State)}") from exc
    _, store = open_job_store(config)
    table = Table("id", "state", "instances", "last received (UTC)", "series UID", "error / warning")
    # On a terminal a long error is cut to keep the rows readable (`jobs show` has it all); in a pipe
    # or a file the line is not wrapped, so it is kept whole: a path in it can be copied.
    limit_chars = 80 if stderr.is_terminal else None
    for job in store.read.jobs(states, limit):
        table.add_row(
            str(job.id), job.state.value, str(job.instances), f"{job.last_received_at:%Y-%m-%d %H:%M:%S}",
            job.series_uid, (job.error or job.warning or "")[:limit_chars],
        )  # fmt: skip
    stderr.print(table)
    counts = ", ".join(f"{k} {v}" for k, v in store.read.counts().items() if v)
    typer.echo(counts or "no jobs")


@jobs_app.command("show")
def show(ref: str = typer.Argument(..., help="Job id or series UID."), config: Path | None = CONFIG_OPTION) -> None:
    """Everything known about one series job and its deliveries."""
    import dataclasses
    import json

    _, store = open_job_store(config)
    job = find_job(store, ref)
    data = dataclasses.asdict(job)
    data["state"] = job.state.value
    data["deliveries"] = [dataclasses.asdict(d) for d in store.read.deliveries(job.id)]
    typer.echo(json.dumps(data, indent=2, default=str))


@jobs_app.command("retry")
def retry(ref: str = typer.Argument(..., help="Job id or series UID."), config: Path | None = CONFIG_OPTION) -> None:
    """Process a failed or ignored series again from the spool."""
    _, store = open_job_store(config)
    job = find_job(store, ref)
    store.retry(job.id)
    typer.echo(f"job {job.id} ({job.series_uid}) queued again")


@jobs_app.command("resend")
def resend(
    ref: str = typer.Argument(..., help="Job id or series UID."),
    destination: list[str] = typer.Option([], "--destination", "-d", help="Only these destinations (repeatable)."),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Send an existing result again (all destinations by default), without recomputing it."""
    settings, store = open_job_store(config)
    job = find_job(store, ref)
    names = destination or [d.name for d in settings.destinations]
    unknown = sorted(set(names) - {d.name for d in settings.destinations})
    if unknown or not names:
        raise typer.BadParameter(
            f"unknown or no destinations {unknown}; configured: {[d.name for d in settings.destinations]}"
        )
    try:
        store.resend(job.id, names)
    except ValueError as exc:
        stderr.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    typer.echo(f"job {job.id} ({job.series_uid}) will be sent to {', '.join(names)} by the next free worker")


def echo(
    target: str | None = typer.Argument(None, help="A configured destination name, or HOST:PORT:AET (default: all)."),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """C-ECHO a destination (or every configured DICOM one); exit 1 if any does not answer."""
    from ctp_node.node.work.scu import echo as c_echo
    from ctp_node.node.work.send_stage import peer_for

    settings = load_settings_or_exit(config)
    if target is None:
        peers = [(d.name, peer_for(d)) for d in settings.destinations if d.kind == "dimse"]
        if not peers:
            raise typer.BadParameter("no DICOM (kind dimse) destinations configured: give HOST:PORT:AET")
    else:
        peers = [(target, peer_or_exit(settings, target))]
    failed = 0
    for name, peer in peers:
        ok, message = c_echo(peer, settings.dicom.ae_title)
        typer.echo(f"{'ok  ' if ok else 'FAIL'} {name}: {message}")
        failed += not ok
    if failed:
        raise typer.Exit(1)
