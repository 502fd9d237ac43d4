"""What several commands share: the --config option, loading the settings, the job store, a job, a peer.

Each helper turns a failure into a one-line error and exit code 2 (or a usage error), never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ctp_node.cli.progress import stderr

if TYPE_CHECKING:
    from ctp_node.config import Settings
    from ctp_node.node.shared.jobs import JobStore, SeriesJob
    from ctp_node.node.shared.peer import Peer

CONFIG_OPTION = typer.Option(
    None, "--config", "-c", envvar="CTP_NODE_CONFIG", help="TOML configuration (default: embedded defaults)."
)


def load_settings_or_exit(config: Path | None) -> Settings:
    """The effective settings (file, then environment); exit 2 with the reason if they cannot be used."""
    from ctp_node.config import load_settings
    from ctp_node.errors import ConfigError

    try:
        return load_settings(config)
    except ConfigError as exc:
        from rich.markup import escape

        # escape: "[...]" in a message (a value, a key) would otherwise be taken for markup and vanish
        stderr.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from exc


def open_job_store(config: Path | None) -> tuple[Settings, JobStore]:
    """The settings and the configured job store, which must exist: a wrong path is an error, never a new store."""
    from ctp_node.errors import StoreMissingError
    from ctp_node.node.shared.jobs import JobStore

    settings = load_settings_or_exit(config)
    try:
        return settings, JobStore(settings.database_url, create=False)
    except StoreMissingError as exc:
        # The error already says where the store was looked for and which keys set it; add only which
        # configuration those came from.
        from rich.markup import escape

        source = config or "none (embedded defaults)"  # typer fills --config from CTP_NODE_CONFIG
        stderr.print(f"[red]error:[/red] {escape(str(exc))}; configuration: {escape(str(source))}", highlight=False)
        raise typer.Exit(2) from exc


def find_job(store: JobStore, ref: str) -> SeriesJob:
    """The job with id or series UID ``ref``; exit 2 naming the command that lists them if there is none."""
    job = store.get(int(ref)) if ref.isdigit() else store.find(ref)
    if job is None:
        stderr.print(f"[red]error:[/red] no job with id or series UID {ref!r}; `ctp-node jobs list` shows them")
        raise typer.Exit(2)
    return job


def peer_or_exit(settings: Settings, target: str) -> Peer:
    """A configured destination by name, else HOST:PORT:AET; a usage error naming both forms otherwise."""
    from ctp_node.node.work.send_stage import find_peer

    try:
        return find_peer(settings.destinations, target)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
