"""`ctp-node jobs`: list, show, retry and re-send series jobs; `ctp-node echo`: check destinations."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ctp_node.cli.common import CONFIG_OPTION, find_job, load_settings_or_exit, open_job_store, peer_or_exit
from ctp_node.cli.progress import stderr

if TYPE_CHECKING:  # imported lazily at run time: `ctp-node --help` loads no database code
    from ctp_node.config import Settings
    from ctp_node.node.shared.jobs import JobStore

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
    settings, store = open_job_store(config)
    job = find_job(store, ref)
    store.retry(job.id)
    _audit(settings, store, "retry", series_uid=job.series_uid, job=job.id)
    typer.echo(f"job {job.id} ({job.series_uid}) queued again")


def _audit(settings: Settings, store: JobStore, event: str, **fields: object) -> None:
    """An action taken from the command line, in the audit trail as the status page's are: by whom
    (the operating-system user running the command) and how."""
    import getpass

    from ctp_node.node.shared.audit import AuditLog

    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in this environment (a container without one)
        user = "unknown"
    AuditLog(settings.storage.audit_log, store).write(event, **fields, by=user, via="command line")


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
    _audit(settings, store, "resend", series_uid=job.series_uid, job=job.id, destinations=names)
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


@jobs_app.command("audit")
def audit(
    series: str | None = typer.Option(None, "--series", help="Only this series (a sent result's source series too)."),
    study: str | None = typer.Option(None, "--study", help="Only this study."),
    since: str | None = typer.Option(None, "--since", help="Only events at or after this ISO time (UTC if no offset)."),
    limit: int = typer.Option(1000, "--limit", min=1, help="The newest this many events, printed oldest first."),
    as_json: bool = typer.Option(
        False, "--json", help="One JSON object per line (the file's record, with id and node_host)."
    ),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """The audit trail in the job store, every host's: what came in and what went out, oldest first.

    A table (on stderr, like `jobs list`) or, with --json, one record per line on stdout."""
    import json

    from rich.markup import escape

    from ctp_node.node.shared.audit import NoAuditTable, audit_events, utc_time
    from ctp_node.node.shared.health import one_line
    from ctp_node.node.shared.jobs_read import StoreError

    after = None
    if since is not None:
        after = utc_time(since)
        if after is None:
            raise typer.BadParameter(f"{since!r} is not an ISO time (e.g. 2026-12-07T08:00 or 2026-12-07T08:00+01:00)")
    try:
        _, store = open_job_store(config)
        events, total = audit_events(store, series_uid=series, study_uid=study, since=after, limit=limit)
    except StoreError as exc:
        stderr.print(
            f"[red]error:[/red] the job store does not answer ({escape(one_line(exc))}); check jobs.database_url"
            " (`ctp-node config` prints the effective one)",
            highlight=False,
        )
        raise typer.Exit(2) from exc
    except NoAuditTable as exc:
        stderr.print(
            "[red]error:[/red] the job store has no audit trail yet (table audit_events): a node of this version"
            " creates it when it starts; until then each host's audit.jsonl (storage.audit_log) is the trail",
            highlight=False,
        )
        raise typer.Exit(2) from exc
    if as_json:
        for e in events:
            typer.echo(json.dumps({"id": e.id, "node_host": e.node_host, **e.record}, default=str, sort_keys=True))
    else:
        from rich.table import Table

        table = Table("time (UTC)", "event", "node host", "series UID", "details")
        for e in events:
            details = ", ".join(
                f"{k}={v}"
                for k, v in e.record.items()
                if k not in ("time", "event", "series_uid", "source_series_uid", "study_uid")
            )
            cells = (e.event, e.node_host, e.series_uid or "", details)  # escaped: "[...]" is not markup
            table.add_row(f"{e.time:%Y-%m-%d %H:%M:%S.%f}"[:-3], *map(escape, cells))
        if events:
            stderr.print(table)
    if not total:
        stderr.print(
            "no audit events in the job store"
            + (" that match" if series or study or since else "")
            + " (records written before this version are only in each host's audit.jsonl)",
            highlight=False,
        )
    elif total > len(events):
        stderr.print(f"the newest {len(events)} of {total} events; --limit for more", highlight=False)
