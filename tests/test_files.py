"""ctp_node.files.atomic_write: all or nothing, private mode, no temporary left behind."""

from __future__ import annotations

import os
import stat

import pytest

from ctp_node.files import TEMPORARY_SUFFIX, atomic_write
from ctp_node.permissions import FILE_MODE


def test_the_file_appears_whole_with_the_node_mode_and_nothing_else(tmp_path):
    target = tmp_path / "a.dcm"
    old_umask = os.umask(0o022)  # a permissive umask must not widen the mode
    try:
        with atomic_write(target) as fh:
            fh.write(b"first half ")
            assert not target.exists()  # a reader sees nothing before the rename
            hidden = [p.name for p in tmp_path.iterdir()]
            assert len(hidden) == 1 and hidden[0].startswith(".a.dcm.") and hidden[0].endswith(TEMPORARY_SUFFIX)
            fh.write(b"second half")
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"first half second half"
    assert stat.S_IMODE(target.stat().st_mode) == FILE_MODE
    assert [p.name for p in tmp_path.iterdir()] == ["a.dcm"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.npy"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_write(target, suffix=".tmp") as fh:
        fh.write(b"new, partial")
        raise RuntimeError("disk on fire")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.npy"]


def test_a_rewrite_replaces_the_file_and_a_missing_folder_is_an_error(tmp_path):
    target = tmp_path / "a.bin"
    for content in (b"one", b"two"):
        with atomic_write(target, sync_folder=False) as fh:
            fh.write(content)
    assert target.read_bytes() == b"two"
    with pytest.raises(FileNotFoundError), atomic_write(tmp_path / "missing" / "a.bin"):
        pass
