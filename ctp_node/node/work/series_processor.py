"""The process stage's processor: a job's spooled files through ``ctp_node.series.pipeline.run_series``.

The series pipeline knows nothing about jobs; the worker's process stage
(``ctp_node.node.work.process_stage``) is given this processor (``ctp-node worker`` makes it with the
configured model) and calls it with a claimed job, its spooled files and a staging folder. It is kept
apart from the stage so that the stages and the worker loop do not import the series pipeline (a send
stage on its own, ``worker --send-only``, loads no series code). While a job is processed, the
engine's progress goes to the log and, when the stage says where (``reporting_progress``), into the
job's row of the job store, at a bounded rate, so the status page shows how far the job is and when it
should end (``ctp_node.node.work.progress``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from ctp_node.errors import NotCTPError
from ctp_node.node.shared.jobs import SeriesJob
from ctp_node.node.work.process_stage import ProcessOutput
from ctp_node.node.work.progress import current_reporter
from ctp_node.series.pipeline import SeriesPipeline, run_series
from model.engine import ProgressLog

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]


def _both(first: ProgressFn, second: ProgressFn | None) -> ProgressFn:
    if second is None:
        return first

    def progress(done: int, total: int) -> None:
        first(done, total)
        second(done, total)

    return progress


def make_processor(
    pipeline: SeriesPipeline, progress: ProgressFn | None = None
) -> Callable[[SeriesJob, Sequence[Path], Path], ProcessOutput]:
    """Run the pipeline on the spooled files of a job. ``progress``: the engine's volume-steps (default:
    a line in the log every 10 s or 10 %, since a worker has no terminal)."""

    def process(job: SeriesJob, files: Sequence[Path], out_dir: Path) -> ProcessOutput:
        if not files:
            raise NotCTPError(f"series {job.series_uid} has no spooled instances")
        shown = progress or ProgressLog(log.info, f"series {job.series_uid} inpainting", steps=pipeline.steps)
        result = run_series(pipeline, files, out_dir, progress=_both(shown, current_reporter()))
        assert result.derived is not None  # written: an out_dir was given
        log.info(
            "series %s: %d instances written (%d synthetic seconds) in %.1f s %s",
            job.series_uid, result.derived.count, int(result.synthetic.sum()), result.seconds["total"],
            {k: round(v, 2) for k, v in result.seconds.items()},
        )  # fmt: skip
        verdict = result.guardrail
        warning = "; ".join(result.warnings) or None  # e.g. outputs not made: stated on the job, still sent
        return ProcessOutput(out_dir, result.derived.count, verdict.summary() if verdict else None, warning)

    return process
