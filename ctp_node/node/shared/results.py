"""Where results live: the one spelling of the results folder's layout.

Written by the process stage, delivered by the send stage, shown by the status page, rotated by
``deploy/bin/ctp-node-rotate-spool`` (which imports it)::

    <data>/results/<StudyInstanceUID>/<SeriesInstanceUID>/g<generation>/*.dcm

one folder per generation (a late instance re-opens a series as generation + 1), holding the
derived series and the perfusion outputs the send stage delivers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ctp_node.config import StorageSettings
from ctp_node.node.shared.spool import check_uid


@dataclass(frozen=True)
class ResultsLayout:
    """The results folder: ``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/g<generation>/``, holding the
    synthetic series (``*.dcm``), the perfusion outputs (``perfusion/<output>/*.dcm``, each its own
    series), the QA report PNG and ``guardrail.json``."""

    root: Path

    @classmethod
    def of(cls, storage: StorageSettings) -> ResultsLayout:
        return cls(storage.results_dir)

    def series_dir(self, study_uid: str, series_uid: str) -> Path:
        """Every generation of one series' results (the UIDs are validated: no path outside the root)."""
        return self.root / check_uid(study_uid, "StudyInstanceUID") / check_uid(series_uid, "SeriesInstanceUID")

    def generation_dir(self, study_uid: str, series_uid: str, generation: int) -> Path:
        """Where the processing stage writes the result of one generation."""
        return self.series_dir(study_uid, series_uid) / f"g{int(generation)}"

    @staticmethod
    def files(result_dir: Path | str) -> list[Path]:
        """The instances of a recorded result, as the send stage delivers them (temporary files of an
        interrupted atomic write start with a dot and are never sent)."""
        return sorted(p for p in Path(result_dir).rglob("*.dcm") if not p.name.startswith("."))
