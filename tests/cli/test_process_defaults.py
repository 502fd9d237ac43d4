"""`ctp-node process` with no sampler option uses the checkpoint's recommendation, logs progress lines
when stderr is not a terminal, and reports the guardrail's verdict."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from ctp_node.cli.main import app
from model.checkpoint import set_recommended_sampler
from tests.cli_output import flat
from tests.integration.node_helpers import cpu_checkpoint, node_settings, phantom_files, write_config

runner = CliRunner()  # its stderr is not a terminal, as under a service manager or a redirect


def test_process_takes_the_checkpoints_sampler_and_logs_progress(tmp_path):
    files = phantom_files(tmp_path / "study", duration_s=9)
    checkpoint = set_recommended_sampler(cpu_checkpoint(tmp_path / "net.pt"), "ddim", 1)
    settings = node_settings(tmp_path / "node", checkpoint, None, model={"steps": None})
    assert settings.model.sampler is None and settings.model.steps is None
    config = write_config(tmp_path / "ctp-node.toml", settings)
    result = runner.invoke(app, ["process", str(files[0].parent), "-o", str(tmp_path / "out"), "-c", str(config)])
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert "sampler ddim, 1 steps" in text
    # progress as plain log lines: targets done/total, elapsed and ETA, ending at 100 %
    assert "targets (100%), elapsed" in text and "ETA 0 s" in text
    assert "━" not in result.output  # no bar drawn into a log
    assert "guardrail:" in text
    (series_dir,) = list((tmp_path / "out").iterdir())
    verdict = json.loads((series_dir / "guardrail.json").read_text())
    assert verdict["policy"] == "flag" and verdict["synthetic_seconds"] == 6


def test_an_explicit_sampler_wins_over_the_recommendation(tmp_path):
    files = phantom_files(tmp_path / "study", duration_s=9)
    checkpoint = set_recommended_sampler(cpu_checkpoint(tmp_path / "net.pt"), "ddim", 1)
    settings = node_settings(tmp_path / "node", checkpoint, None, model={"steps": None})
    config = write_config(tmp_path / "ctp-node.toml", settings)
    args = ["process", str(files[0].parent), "-o", str(tmp_path / "out"), "-c", str(config), "--sampler", "dpmpp_2m"]
    result = runner.invoke(app, [*args, "--steps", "1"])
    assert result.exit_code == 0, result.output
    assert "sampler dpmpp_2m, 1 steps" in flat(result.output)
