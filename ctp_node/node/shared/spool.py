"""The spool: every received instance as a file, durable before the sender hears Success.

Layout (defined here only): ``<spool>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.
UIDs become path components, so each is validated first (digits and dots, at most 64 characters:
no traversal, no separators). A write goes to a temporary name in the same folder, is fsync'd,
renamed into place, and the folder is fsync'd so the rename itself survives a crash. Files are
created 0640 and folders 0750 whatever the umask (``ctp_node.permissions``).

A C-STORE data set is written as it arrives to ``<spool>/.incoming/`` (``ctp_node.node.receive.scp``): on the
spool's own filesystem, so that an accepted instance is renamed into place (:meth:`Spool.move_in`)
rather than copied, and never held in memory. Files there are never acknowledged: the SCP removes
each one it does not move in, and :meth:`Spool.remove_partial_files` sweeps what a crash left.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ctp_node.errors import InvalidUIDError
from ctp_node.files import atomic_write, fsync_dir
from ctp_node.node.shared.completeness import InstanceFacts, read_facts
from ctp_node.permissions import FILE_MODE, make_dirs

UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
TMP_SUFFIX = ".part"
INCOMING_DIR = ".incoming"  # data sets being received (not a UID, so never taken for a study)


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


def series_dir(root: Path, key: SeriesKey) -> Path:
    """Where the spool under ``root`` keeps one series' instances; creates nothing, so a reader (the status
    page) finds a series' files without making the spool. InvalidUIDError for a UID that is not one."""
    return Path(root) / check_uid(key.study_uid, "StudyInstanceUID") / check_uid(key.series_uid, "SeriesInstanceUID")


class Spool:
    """Files of received instances, grouped by study and series."""

    def __init__(self, root: Path) -> None:
        self.root = make_dirs(Path(root))

    def series_dir(self, key: SeriesKey) -> Path:
        return series_dir(self.root, key)

    def instance_path(self, key: SeriesKey, sop_uid: str) -> Path:
        return self.series_dir(key) / f"{check_uid(sop_uid, 'SOPInstanceUID')}.dcm"

    def write(self, key: SeriesKey, sop_uid: str, data: bytes | Sequence[bytes | memoryview]) -> Path:
        """Write one instance durably; a repeat of the same SOP Instance UID replaces the earlier file.
        ``data``: the bytes, or pieces written one after the other (no copy joins them)."""
        target = self.instance_path(key, sop_uid)
        folder = target.parent
        new_folder = not folder.exists()
        make_dirs(folder)
        with atomic_write(target, suffix=TMP_SUFFIX) as fh:
            for piece in (data,) if isinstance(data, bytes | bytearray) else data:
                fh.write(piece)
        if new_folder:
            fsync_dir(folder.parent)
            fsync_dir(self.root)
        return target

    @property
    def incoming_dir(self) -> Path:
        """Where the SCP writes data sets while they arrive (made by the SCP when the first one arrives)."""
        return self.root / INCOMING_DIR

    def move_in(self, key: SeriesKey, sop_uid: str, source: Path) -> Path:
        """Put a received file (written under :attr:`incoming_dir`, not yet fsync'd) in its place durably,
        by renaming it: the file is fsync'd, renamed over any earlier one of the same SOP Instance UID, and
        the folder fsync'd. OSError leaves ``source`` where it was (the caller removes it)."""
        target = self.instance_path(key, sop_uid)
        folder = target.parent
        new_folder = not folder.exists()
        make_dirs(folder)
        fd = os.open(source, os.O_RDONLY)
        try:
            os.fchmod(fd, FILE_MODE)  # as every spool file, whoever created this one
            os.fsync(fd)  # the data before the rename, or a crash could leave a named but empty file
        finally:
            os.close(fd)
        try:
            os.replace(source, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            # Only for a file from elsewhere (pynetdicom's own chunked mode writes to the temp folder).
            with open(source, "rb") as src, atomic_write(target, sync_folder=False, suffix=TMP_SUFFIX) as fh:
                shutil.copyfileobj(src, fh, 1 << 20)
            source.unlink(missing_ok=True)
        fsync_dir(folder)
        if new_folder:
            fsync_dir(folder.parent)
            fsync_dir(self.root)
        return target

    def instances(self, key: SeriesKey) -> list[Path]:
        folder = self.series_dir(key)
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.suffix == ".dcm" and not p.name.startswith("."))

    def fetch(self, key: SeriesKey, folder: Path) -> list[Path]:
        """The series' files where a worker reads them: here, in place (``folder`` is for an object
        store's spool, ``ObjectSpool.fetch``, which downloads them there)."""
        return self.instances(key)

    def objects(self, key: SeriesKey) -> list[tuple[str, datetime]]:
        """(SOP Instance UID, time written) of every instance of a series (recovery at start)."""
        return [(p.stem, datetime.fromtimestamp(p.stat().st_mtime, tz=timezone.utc)) for p in self.instances(key)]

    def facts(self, key: SeriesKey, sop_uids: Sequence[str]) -> list[InstanceFacts]:
        """The completeness facts of spooled instances, read from their files."""
        return [read_facts(self.instance_path(key, uid), uid) for uid in sop_uids]

    def iter_series(self) -> Iterator[SeriesKey]:
        """Every series folder on disk (for recovery at start), skipping anything that is not UID-named."""
        for study in sorted(self.root.iterdir()):
            if not study.is_dir() or not UID_PATTERN.match(study.name):
                continue
            for series in sorted(study.iterdir()):
                if series.is_dir() and UID_PATTERN.match(series.name):
                    yield SeriesKey(study.name, series.name)

    def remove_partial_files(self) -> int:
        """Delete temporary files left by a crash mid-write or mid-receive (never acknowledged, so never
        lost); only while no SCP is receiving into this spool (the receiver calls it before it listens)."""
        removed = 0
        for tmp in (*self.root.glob(f"*/*/.*{TMP_SUFFIX}"), *(self.root / INCOMING_DIR).glob(f"*{TMP_SUFFIX}")):
            tmp.unlink(missing_ok=True)
            removed += 1
        return removed
