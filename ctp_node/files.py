"""Atomic, durable file writes: a reader never sees a partial file, a crash leaves the old file or the new one.

Every file the node writes for someone else to read (spooled instances, the synthetic series, the
arrays of ``ctp-node infer``) goes through :func:`atomic_write`: a hidden temporary file in the same
folder, created 0640 whatever the umask (``ctp_node.permissions``), flushed and fsync'd, then renamed
over the target; the folder is fsync'd so the rename itself survives a crash. The model library keeps
its own small checkpoint writer (model/checkpoint.py), since ``model`` imports nothing of the node.
"""

from __future__ import annotations

import contextlib
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
