"""Progress display shared by long-running commands: a rich bar on a terminal, log lines otherwise.

When stderr is not a terminal (a service, a redirect, CI), a bar would be one final line or control
codes; the commands write a timestamped line every 10 s or 10 % instead (``model.engine.ProgressLog``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from datetime import datetime

from rich.console import Console, ConsoleDimensions
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# Rich wraps at 80 columns when it cannot ask a terminal for its width: a pipe, a file, a service's
# journal, a test's CliRunner. Series UIDs (up to 64 characters) and paths would then be split over
# lines or cut in a table cell, and could not be copied. Without a terminal nobody reads the lines at
# a width, so they are as long as their content.
UNWRAPPED_WIDTH = 100_000


class _Console(Console):
    """Rich's console at the terminal's width on a terminal, and without wrapping anywhere else."""

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self.is_terminal or self._width is not None:
            return size
        return ConsoleDimensions(UNWRAPPED_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


stderr = _Console(stderr=True)


def log_line(message: str) -> None:
    """One plain, timestamped line on stderr (no colours, no wrapping): what a log file needs."""
    stderr.print(f"{datetime.now():%Y-%m-%d %H:%M:%S} {message}", markup=False, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def step_progress(
    description: str, enabled: bool = True, *, steps: int = 1, every_s: float = 10.0
) -> Iterator[Callable[[int, int], None]]:
    """Yield a ``progress(done, total)`` callback: one bar on a terminal, else progress lines (every
    ``every_s`` seconds or 10 %; ``steps``: sampler steps per target, to count targets); a no-op when
    disabled."""
    if not enabled:
        yield lambda done, total: None
        return
    if not stderr.is_terminal:
        from model.engine import ProgressLog

        yield ProgressLog(log_line, description, steps=steps, every_s=every_s)
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr, transient=False) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update
