"""Entry point of the `ctp-node` console script.

Each verb lives in its own module and keeps heavy imports (torch, pydicom) inside the command
function, so `ctp-node --help` stays fast.
"""

from __future__ import annotations

import sys
from typing import Any

import click
import typer
from typer import rich_utils
from typer.core import TyperOption

from ctp_node import __version__
from ctp_node.cli import (
    bench_cmd,
    config_cmd,
    demo_cmd,
    evaluate_cmd,
    infer_cmd,
    jobs_cmd,
    node_cmd,
    perfusion_cmd,
    phantom_cmd,
    process_cmd,
    train_cmd,
)

_typed_label = TyperOption.display_type_rich


def _label_without_flags(self: TyperOption, ctx: Any) -> str | None:
    """Typer labels flags with their Python type too (``--nifti <bool>``), which reads as if the flag
    took a value; a flag or a counter takes none, so its help line gets no type label."""
    if self.is_flag or self.count:
        return None
    return _typed_label(self, ctx)


TyperOption.display_type_rich = _label_without_flags  # type: ignore[method-assign]

_boxed_error = rich_utils.rich_format_error


def _error_for_the_reader(error: click.ClickException) -> None:
    """A usage error in Typer's box on a terminal; elsewhere (a service, a pipe, a script's log) Click's
    plain lines: the box is drawn at 80 columns there and splits a long path or value over lines."""
    if sys.stderr.isatty():
        _boxed_error(error)
    else:
        error.show()


rich_utils.rich_format_error = _error_for_the_reader

app = typer.Typer(
    name="ctp-node",
    help="Inpaint sparsely sampled CT perfusion to 1 s with a conditional diffusion model. Research use only.\n\n"
    "-c is --config in every command that reads a configuration; a checkpoint is always --checkpoint.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ctp-node {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """ctp-node: CT perfusion temporal inpainting node (research use only)."""


app.command("infer")(infer_cmd.infer)
app.command("bench")(bench_cmd.bench)
app.command("config")(config_cmd.config)
app.command("perfusion")(perfusion_cmd.perfusion)
app.command("phantom")(phantom_cmd.phantom)
app.command("train")(train_cmd.train)
app.command("serve")(node_cmd.serve)
app.command("worker")(node_cmd.worker)
app.add_typer(jobs_cmd.jobs_app, name="jobs")
app.command("echo")(jobs_cmd.echo)
app.command("process")(process_cmd.process)
app.command("reprocess")(process_cmd.reprocess)
app.command("demo")(demo_cmd.demo)
app.command("evaluate")(evaluate_cmd.evaluate)
