"""`ctp-node phantom` through typer's CliRunner, including a C-STORE to DCMTK's storescp."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from ctp_node.cli.main import app
from ctp_node.series.assemble import assemble_series
from tests.dcmtk import require
from tests.peers import stop_process
from tests.ports import free_port, wait_for_port

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, ["phantom", *args, "--no-progress"])


def test_npy_layout_is_the_published_array_layout(tmp_path):
    result = _run(str(tmp_path), "--layout", "npy", "--duration", "25", "--schedule", "every:4", "--noise", "0")
    assert result.exit_code == 0, result.output
    array = np.load(tmp_path / "phantom.npy")
    assert array.shape == (8, 192, 192, 7) and array.dtype == np.float32
    assert array.min() == 0.0 and array.max() == 80.0  # windowed: enhanced arteries saturate at 80
    assert array[..., 0].max() < 50.0  # before the bolus: skull stripped, brain and vessels below 50 HU
    truth = np.load(tmp_path / "truth.npz")
    assert np.all(array[~truth["brain_mask"]] == 0)  # skull-stripped
    assert truth["cbf"].shape == (8, 192, 192) and truth["core_mask"].any()
    meta = json.loads((tmp_path / "phantom.json").read_text())
    assert meta["times_s"] == [0.0, 4.0, 8.0, 12.0, 16.0, 20.0, 24.0] and meta["spacing_mm"] == [5.0, 1.25, 1.25]
    assert meta["axes"] == "z,y,x,t" and meta["labels"]["gm_core"] == 10


def test_npy_layout_refuses_other_grids(tmp_path):
    result = _run(str(tmp_path), "--layout", "npy", "--matrix", "64", "--duration", "4")
    assert result.exit_code == 2
    assert "--matrix 192 --slices 8" in result.output
    assert not (tmp_path / "phantom.npy").exists()


def test_single_frame_with_schedule_and_drop(tmp_path):
    result = _run(
        str(tmp_path), "--matrix", "64", "--slices", "2", "--duration", "9", "--schedule", "every:2", "--drop", "1",
        "--transfer-syntax", "rle", "--vendor", "siemens",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    files = sorted((tmp_path / "dicom").iterdir())
    assert len(files) == 4 * 2
    series = assemble_series(files)
    assert series.times_s.tolist() == [0.0, 4.0, 6.0, 8.0]
    meta = json.loads((tmp_path / "phantom.json").read_text())
    assert meta["times_s"] == [0.0, 4.0, 6.0, 8.0] and meta["vendor"] == "siemens"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layout", "mosaic"], "mosaic"),
        (["--schedule", "every:x"], "not a number"),
        (["--drop", "a,b"], "comma-separated integers"),
        (["--duration", "-3"], "duration_s"),
        (["--layout", "npy", "--send", "127.0.0.1:104:PACS"], "needs a DICOM layout"),
        (["--send", "localhost:PACS"], "HOST:PORT:AET"),
    ],
)
def test_bad_options_fail_with_a_clear_message(tmp_path, args, message):
    result = _run(str(tmp_path), "--matrix", "64", "--slices", "2", "--duration", "4", *args)
    assert result.exit_code == 2
    assert message in result.output


@pytest.fixture
def storescp(tmp_path):
    """DCMTK storescp on a free loopback port, writing into tmp_path/received; stopped by PID."""
    binary = require("storescp")  # DCMTK's, not pynetdicom's app of the same name
    port = free_port()
    received = tmp_path / "received"
    received.mkdir()
    proc = subprocess.Popen(
        [binary, "-aet", "STORESCP", "-od", str(received), "+xa", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc, "storescp", timeout_s=10)
        yield port, received
    finally:
        stop_process(proc)


def test_send_stores_every_file_in_the_peer(tmp_path, storescp):
    port, received = storescp
    syntax = "jpeg-lossless" if shutil.which("dcmcjpeg") else "explicit"
    out = tmp_path / "out"
    result = _run(
        str(out), "--matrix", "64", "--slices", "2", "--duration", "6", "--schedule", "every:2",
        "--transfer-syntax", syntax, "--send", f"127.0.0.1:{port}:STORESCP",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "sent 6 files to STORESCP" in result.output
    stored = sorted(p for p in received.iterdir() if p.is_file())
    assert len(stored) == 6
    assert np.array_equal(assemble_series(stored).hu, assemble_series(sorted((out / "dicom").iterdir())).hu)


def test_send_to_a_closed_port_fails_clearly(tmp_path):
    result = _run(
        str(tmp_path), "--matrix", "64", "--slices", "2", "--duration", "4",
        "--send", f"127.0.0.1:{free_port()}:NOBODY",
    )  # fmt: skip
    assert result.exit_code == 2
    assert "send failed" in result.output and "no association with NOBODY" in result.output


def test_registered_in_the_main_app():
    result = runner.invoke(app, ["phantom", "--help"])
    assert result.exit_code == 0 and "--transfer-syntax" in result.output


def test_loading_the_command_loads_neither_numpy_nor_pydicom_nor_the_phantom():
    """`ctp-node --help` and every other command import this module: the heavy work waits for the call."""
    heavy = ("numpy", "pydicom", "ctp_node.phantom")
    code = f"import sys, ctp_node.cli.phantom_cmd; print([m for m in {heavy!r} if m in sys.modules])"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
