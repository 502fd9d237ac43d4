"""The spool: every received instance as a file, durable before the sender hears Success.

Layout (defined here only): ``<spool>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.
UIDs become path components, so each is validated first (digits and dots, at most 64 characters:
no traversal, no separators). A write goes to a temporary name in the same folder, is fsync'd,
renamed into place, and the folder is fsync'd so the rename itself survives a crash. Files are
created 0640 and folders 0750 whatever the umask (``ctp_node.permissions``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ctp_node.errors import InvalidUIDError
from ctp_node.files import atomic_write, fsync_dir
from ctp_node.permissions import make_dirs

UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
TMP_SUFFIX = ".part"


def check_uid(uid: object, name: str) -> str:
    """The UID as a string, or InvalidUIDError naming the attribute and the value."""
    text = str(uid).strip().rstrip("\x00") if uid is not None else ""
    if not text or len(text) > 64 or not UID_PATTERN.match(text):
        raise InvalidUIDError(f"{name} {text[:80]!r} is not a valid DICOM UID (digits and dots, at most 64 characters)")
    return text


@dataclass(frozen=True)
class SeriesKey:
    study_uid: str
    series_uid: str


class Spool:
    """Files of received instances, grouped by study and series."""

    def __init__(self, root: Path) -> None:
        self.root = make_dirs(Path(root))

    def series_dir(self, key: SeriesKey) -> Path:
        return self.root / check_uid(key.study_uid, "StudyInstanceUID") / check_uid(key.series_uid, "SeriesInstanceUID")

    def instance_path(self, key: SeriesKey, sop_uid: str) -> Path:
        return self.series_dir(key) / f"{check_uid(sop_uid, 'SOPInstanceUID')}.dcm"

    def write(self, key: SeriesKey, sop_uid: str, data: bytes) -> Path:
        """Write one instance durably; a repeat of the same SOP Instance UID replaces the earlier file."""
        target = self.instance_path(key, sop_uid)
        folder = target.parent
        new_folder = not folder.exists()
        make_dirs(folder)
        with atomic_write(target, suffix=TMP_SUFFIX) as fh:
            fh.write(data)
        if new_folder:
            fsync_dir(folder.parent)
            fsync_dir(self.root)
        return target

    def instances(self, key: SeriesKey) -> list[Path]:
        folder = self.series_dir(key)
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.suffix == ".dcm" and not p.name.startswith("."))

    def iter_series(self) -> Iterator[SeriesKey]:
        """Every series folder on disk (for recovery at start), skipping anything that is not UID-named."""
        for study in sorted(self.root.iterdir()):
            if not study.is_dir() or not UID_PATTERN.match(study.name):
                continue
            for series in sorted(study.iterdir()):
                if series.is_dir() and UID_PATTERN.match(series.name):
                    yield SeriesKey(study.name, series.name)

    def remove_partial_files(self) -> int:
        """Delete temporary files left by a crash mid-write (never acknowledged, so never lost)."""
        removed = 0
        for tmp in self.root.glob(f"*/*/.*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
            removed += 1
        return removed
