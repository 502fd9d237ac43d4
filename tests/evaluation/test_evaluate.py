"""`ctp-node evaluate` writes its JSON, Markdown table and figures; the numbers are the metrics'."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from ctp_node.cli.main import app
from ctp_node.evaluation.static_ct import offline_head_cts
from tests.integration.node_helpers import cpu_checkpoint

runner = CliRunner()


@pytest.mark.slow
def test_evaluate_on_phantom_reports_issue_10_targets(tmp_path):
    checkpoint = cpu_checkpoint(tmp_path / "net.pt")
    out = tmp_path / "eval"
    static = offline_head_cts()[0]
    result = runner.invoke(
        app,
        [
            "evaluate", "--checkpoint", str(checkpoint), "-o", str(out), "--gaps", "4", "--studies", "1",
            "--matrix", "96",
            "--sampler", "ddim", "--steps", "1", "--device", "cpu", "--static-ct", str(static),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads((out / "evaluation.json").read_text())
    assert {row["candidate"] for row in data["rows"]} == {"model", "linear", "grid_linear", "reference"}
    summary = {s["candidate"]: s["metrics"] for s in data["summary"]}
    linear, reference = summary["linear"], summary["reference"]
    for tissue in ("gm", "wm", "core", "penumbra", "csf"):
        # Interpolating (or acquiring) every second leaves no offset against the noise-free truth...
        assert abs(linear[f"offset_hu.{tissue}"]["mean"]) < 0.3
        assert abs(reference[f"offset_hu.{tissue}"]["mean"]) < 0.3
    # ...but the noise stays: the truth is the noise-free study, not the acquired one.
    assert 15 < reference["psnr_db"]["mean"] < 30
    assert linear["curve_rmse_hu.gm"]["mean"] > reference["curve_rmse_hu.gm"]["mean"] > 0
    assert linear["aif.peak_time_abs_error_s"]["mean"] >= 0 and linear["aif.truth_peak_hu"]["mean"] > 200
    for name in ("cbf", "cbv", "mtt", "tmax"):
        assert 0 < reference[f"map.{name}"]["mean"] < linear[f"map.{name}"]["mean"]
    for row in data["rows"]:  # issue 20: volumes and the DEFUSE 3 decision for every candidate
        metrics = row["metrics"]
        for volume in ("core", "tmax6", "mismatch"):
            assert metrics[f"volume_abs_error_ml.{volume}"] == pytest.approx(abs(metrics[f"volume_error_ml.{volume}"]))
        assert metrics["decision.agrees"] in (0, 1) and metrics["decision.reported"] in (0, 1)
        assert metrics["decision.agrees"] == (metrics["decision.defuse3"] == metrics["decision.truth_defuse3"])
    targets = {t["target"] for t in data["targets"]}
    assert len(targets) == 10 and any("static real CT" in t for t in targets)
    (static_row,) = data["static_ct"]
    assert static_row["synthetic_seconds"] == 6 and static_row["n_voxels"] > 10_000
    table = (out / "evaluation.md").read_text()
    for heading in (
        "## Targets", "per tissue", "Mean tissue curves", "Perfusion maps", "arterial input", "Static",
        "Lesion volumes", "Every study's volumes",
    ):  # fmt: skip
        assert heading in table
    assert "| 4 | 1 s acquisition |" in table and "**fail**" in table
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
            "--checkpoint",
            str(checkpoint),
            "--data",
            str(data),
            "-o",
            str(out),
            "--gaps",
            "4",
            "--steps",
            "1",
            "--sampler",
            "ddim",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads((out / "evaluation.json").read_text())
    assert {r["candidate"] for r in data["rows"]} == {"model", "linear"} and not data["static_ct"]
    assert all(set(r["metrics"]) == {"psnr_db", "ssim", "mae_hu", "offset_hu.brain"} for r in data["rows"])
    table = (out / "evaluation.md").read_text()
    assert "| 4 | linear interpolation |" in table and "Perfusion maps" not in table
    bad = runner.invoke(app, ["evaluate", "--checkpoint", str(checkpoint), "--gaps", "12"])
    assert bad.exit_code != 0
    missing = runner.invoke(app, ["evaluate", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "nowhere")])
    assert missing.exit_code != 0
    family = runner.invoke(app, ["evaluate", "--checkpoint", str(checkpoint), "--family", "c"])
    assert family.exit_code != 0 and "unknown phantom family" in family.output
    static = runner.invoke(
        app, ["evaluate", "--checkpoint", str(checkpoint), "--static-ct", str(tmp_path / "none.dcm")]
    )
    assert static.exit_code == 2 and "--static-ct" in static.output
