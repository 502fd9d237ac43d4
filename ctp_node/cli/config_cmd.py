"""`ctp-node config`: print the effective configuration, or check a file."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ctp_node.cli.common import load_settings_or_exit
from ctp_node.cli.progress import stderr


def config(
    file: Path | None = typer.Argument(
        None,
        help="TOML configuration file, as `ctp-node config --check FILE` (the same as --config FILE).",
        show_default=False,
    ),
    config_file: Path | None = typer.Option(
        None, "--config", "-c", envvar="CTP_NODE_CONFIG", help="TOML configuration file (default: embedded defaults)."
    ),
    check: bool = typer.Option(False, "--check", help="Only validate; exit 0 when valid, 2 with the reasons if not."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of TOML."),
) -> None:
    """Print the effective configuration (file, then CTP_NODE_<SECTION>__<KEY> environment overrides)."""
    import tomli_w

    if file is not None:  # named twice (e.g. FILE and CTP_NODE_CONFIG): the one on the command line wins
        config_file = file

    settings = load_settings_or_exit(config_file)
    if check:
        stderr.print(f"configuration valid ({config_file or 'embedded defaults'})")
        return
    data = settings.to_toml_dict()
    data["jobs"]["database_url"] = settings.database_url
    typer.echo(json.dumps(data, indent=2) if as_json else tomli_w.dumps(data))
