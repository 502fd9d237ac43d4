"""`ctp-node evaluate` writes its JSON, Markdown table and figures; the numbers are the metrics'."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from ctp_node.cli.main import app
from tests.integration.node_helpers import cpu_checkpoint

runner = CliRunner()


@pytest.mark.slow
def test_evaluate_on_phantom_writes_json_table_and_figures(tmp_path):
    checkpoint = cpu_checkpoint(tmp_path / "net.pt")
    out = tmp_path / "eval"
    result = runner.invoke(
        app,
        [
            "evaluate",
            "-c",
            str(checkpoint),
            "-o",
            str(out),
            "--gaps",
            "4",
            "--studies",
            "1",
            "--matrix",
            "96",
            "--steps",
            "1",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads((out / "evaluation.json").read_text())
    methods = {row["method"] for row in data["rows"]}
    assert methods == {"model", "linear"}
    linear = next(s for s in data["summary"] if s["method"] == "linear")
    assert 20 < linear["psnr_db"] < 60 and 0 < linear["ssim"] <= 1
    assert 0 <= linear["hypoperfusion_dice"] <= 1 and "cbf_grey_rel_err" in linear
    table = (out / "evaluation.md").read_text()
    assert "| 4 | model |" in table and "| 4 | linear |" in table
    for name in ("montage_gap4.png", "curves_gap4.png", "maps_gap4.png"):
        assert (out / name).stat().st_size > 10_000


def test_evaluate_npy_and_bad_options(tmp_path):
    checkpoint = cpu_checkpoint(tmp_path / "net.pt")
    data = tmp_path / "val"
    data.mkdir()
    rng = np.random.default_rng(0)
    seq = np.zeros((8, 192, 192, 9), np.float32)
    seq[:, 40:150, 40:150] = 30 + 10 * np.sin(np.arange(9) / 3) + rng.normal(0, 1, (8, 110, 110, 9))
    np.save(data / "case.npy", seq)
    out = tmp_path / "eval"
    result = runner.invoke(
        app,
        [
            "evaluate",
            "-c",
            str(checkpoint),
            "--data",
            str(data),
            "-o",
            str(out),
            "--gaps",
            "4",
            "--steps",
            "1",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "evaluation.json").read_text())["rows"]
    assert len(rows) == 2 and all(r["perfusion_vs_truth"] is None for r in rows)
    assert "n/a" in (out / "evaluation.md").read_text()
    bad = runner.invoke(app, ["evaluate", "-c", str(checkpoint), "--gaps", "12"])
    assert bad.exit_code != 0
    missing = runner.invoke(app, ["evaluate", "-c", str(checkpoint), "--data", str(tmp_path / "nowhere")])
    assert missing.exit_code != 0
