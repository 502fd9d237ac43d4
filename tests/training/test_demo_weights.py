import json

import pytest
import tomli_w
from typer.testing import CliRunner

from ctp_node.cli.main import app
from model.checkpoint import load_denoiser
from training.config import parse_config
from training.demo_weights import train_in_budget

from .helpers import tiny_config_dict, write_npy_data

runner = CliRunner()


def test_calibrated_run_fits_the_budget_and_exports_bf16_weights(tmp_path):
    data_root = write_npy_data(tmp_path / "data")
    config = tmp_path / "run.toml"
    config.write_text(tomli_w.dumps(tiny_config_dict(data_root, tmp_path / "run")))
    result = runner.invoke(app, ["train", "--config", str(config), "--minutes", "0.05", "--calibration-steps", "3"])
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "run" / "demo_weights_run.json").read_text())
    assert json.loads(result.stdout.splitlines()[-1]) == plan and plan["config"] == str(config)
    assert plan["calibration_seconds_per_step"] > 0
    # the planned iterations are the budget over the measured step time (with the overhead allowance)
    assert plan["iterations"] == max(1, int(0.05 * 60 / (plan["calibration_seconds_per_step"] * 1.08)))
    assert plan["steps"] == plan["iterations"] and not plan["stopped"]
    denoiser = load_denoiser(plan["export"])
    assert denoiser.info.step == plan["steps"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["optim"]["iterations"] == plan["iterations"]


def test_a_budget_cannot_resume_or_fix_the_iterations(tmp_path):
    result = runner.invoke(app, ["train", "--config", "x.toml", "--minutes", "1", "--iterations", "5"])
    assert result.exit_code == 2 and "--minutes plans the iterations of a fresh run" in result.output


def test_a_budget_needs_positive_minutes_and_an_overhead_of_at_least_one(tmp_path):
    config = parse_config(tiny_config_dict(tmp_path / "data", tmp_path / "run"))
    with pytest.raises(ValueError, match="need minutes > 0"):
        train_in_budget(config, 0.0)
    with pytest.raises(ValueError, match="overhead >= 1"):
        train_in_budget(config, 1.0, overhead=0.5)
