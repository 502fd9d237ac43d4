"""What a run shows: a progress bar (loss, it/s) on stderr and TensorBoard scalars and images.

Only the main process monitors; the other ranks get :class:`SilentMonitor`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


class Monitor(Protocol):
    def start(self, step: int) -> None: ...
    def step(self, step: int, loss: float | None) -> None: ...
    def scalars(self, step: int, values: dict[str, float]) -> None: ...
    def image(self, step: int, tag: str, image: torch.Tensor) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...


class SilentMonitor:
    """For ranks other than 0: shows and writes nothing."""

    def start(self, step: int) -> None:
        pass

    def step(self, step: int, loss: float | None) -> None:
        pass

    def scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def image(self, step: int, tag: str, image: torch.Tensor) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class RunMonitor:
    """Progress bar plus a TensorBoard writer under ``log_dir``."""

    def __init__(self, log_dir: Path, *, total: int, progress: bool = True) -> None:
        self.log_dir, self.total, self.progress = log_dir, total, progress
        self.console = Console(stderr=True)
        self._writer: SummaryWriter | None = None
        self._bar: Progress | None = None
        self._last = (0, time.perf_counter())

    def start(self, step: int) -> None:
        """Open the event file and the bar at ``step``; a resumed run drops events logged after it."""
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=step or None)
        self._last = (step, time.perf_counter())
        if self.progress:
            self._bar = Progress(
                TextColumn("training"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[rate]} it/s"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._task = self._bar.add_task("training", total=self.total, completed=step, loss="-", rate="-")
            self._bar.start()

    @property
    def writer(self) -> SummaryWriter:
        if self._writer is None:
            raise RuntimeError("RunMonitor.start() must be called before logging")
        return self._writer

    def step(self, step: int, loss: float | None) -> None:
        """Called after every step; ``loss`` when a fresh running mean is available."""
        if self._bar is None:
            return
        fields = {}
        if loss is not None:
            last_step, last_time = self._last
            now = time.perf_counter()
            rate = (step - last_step) / max(now - last_time, 1e-9)
            self._last = (step, now)
            fields = {"loss": f"{loss:.4f}", "rate": f"{rate:.2f}"}
        self._bar.update(self._task, completed=step, **fields)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def image(self, step: int, tag: str, image: torch.Tensor) -> None:
        """``image``: (1, H, W) in [0, 1]."""
        self.writer.add_image(tag, image.clamp(0, 1), step, dataformats="CHW")

    def message(self, text: str) -> None:
        self.console.print(escape(text), soft_wrap=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        if self._writer is not None:
            self._writer.close()
