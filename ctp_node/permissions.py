"""Modes of what the node writes: patient data is never world-readable, whatever the umask.

Files 0640 and folders 0750 (owner writes, the service group reads: backups, a log shipper), set
explicitly at creation rather than left to the process umask, which is 022 for a node started by
hand and would leave every spooled image readable by all local users. Existing folders (e.g. one an
administrator prepared, or systemd's StateDirectory) keep their mode.
"""

from __future__ import annotations

import os
from pathlib import Path

FILE_MODE = 0o640
DIR_MODE = 0o750


def make_dirs(path: Path) -> Path:
    """``mkdir -p`` that gives every folder it creates DIR_MODE (``Path.mkdir`` leaves that to the umask)."""
    path = Path(path)
    missing = []
    for folder in (path, *path.parents):
        if folder.is_dir():
            break
        missing.append(folder)
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=DIR_MODE)
        except FileExistsError:  # another process made it meanwhile: leave its mode alone
            if not folder.is_dir():
                raise
            continue
        os.chmod(folder, DIR_MODE)  # mkdir's mode is masked by the umask
    return path


def open_new_file(path: Path, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> int:
    """A file descriptor for writing ``path``, the file made FILE_MODE (also when it already existed)."""
    fd = os.open(path, flags, FILE_MODE)
    try:
        if os.fstat(fd).st_mode & 0o7777 != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    except PermissionError:
        pass  # another user's existing file (open succeeded, so we may write it): not ours to change
    except BaseException:
        os.close(fd)
        raise
    return fd


def touch_private(path: Path) -> None:
    """Create ``path`` empty with FILE_MODE if it does not exist (e.g. a SQLite database before first open:
    SQLite gives its -wal and -shm files the database file's mode)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
