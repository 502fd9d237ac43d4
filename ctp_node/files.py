"""Atomic, durable file writes: a reader never sees a partial file, a crash leaves the old file or the new one.

Every file the node writes for someone else to read (spooled instances, the synthetic series, the
arrays of ``ctp-node infer``) goes through :func:`atomic_write`: a hidden temporary file in the same
folder, created 0640 whatever the umask (``ctp_node.permissions``), flushed and fsync'd, then renamed
over the target; the folder is fsync'd so the rename itself survives a crash. The model library keeps
its own small checkpoint writer (model/checkpoint.py), since ``model`` imports nothing of the node.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ctp_node.permissions import FILE_MODE

TEMPORARY_SUFFIX = ".part"  # hidden ``.<name>.<random>.part`` files: what a crash mid-write can leave


def fsync_dir(folder: Path) -> None:
    """Make the entries of ``folder`` (a rename, a new file) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: Path, *, sync_folder: bool = True, suffix: str = TEMPORARY_SUFFIX) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through; it replaces ``path`` only when the block ends normally.

    On an exception the temporary file is removed and ``path`` is left as it was. ``sync_folder=False``
    leaves the folder's fsync to the caller (one fsync after writing many files into it).
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    temporary = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), FILE_MODE)  # mkstemp makes 0600; the node's files are 0640
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if sync_folder:
        fsync_dir(path.parent)


def write_json(path: Path, data: object) -> Path:
    """``data`` as indented JSON at ``path``, atomically and 0640 (job records beside the results)."""
    import json

    with atomic_write(Path(path)) as fh:
        fh.write(json.dumps(data, indent=2, allow_nan=False).encode())
    return Path(path)


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
DISK_FULL_SQLSTATE = "53100"  # PostgreSQL: disk_full


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says the disk or a quota is full: an OSError, SQLite's
    "database or disk is full" or PostgreSQL's disk_full, as such or wrapped by SQLAlchemy."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        if getattr(error, "sqlite_errorname", None) == "SQLITE_FULL" or "database or disk is full" in str(error):
            return True
        if DISK_FULL_SQLSTATE in (getattr(error, "sqlstate", None), getattr(error, "pgcode", None)):
            return True
        pending += [getattr(error, "orig", None), error.__cause__, error.__context__]
    return False
