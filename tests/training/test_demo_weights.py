import json

import tomli_w

from model.checkpoint import load_denoiser
from training.demo_weights import main

from .helpers import tiny_config_dict, write_npy_data


def test_calibrated_run_fits_the_budget_and_exports_bf16_weights(tmp_path):
    data_root = write_npy_data(tmp_path / "data")
    config = tmp_path / "run.toml"
    config.write_text(tomli_w.dumps(tiny_config_dict(data_root, tmp_path / "run")))
    main(["--config", str(config), "--minutes", "0.05", "--calibration-steps", "3"])
    plan = json.loads((tmp_path / "run" / "demo_weights_run.json").read_text())
    assert plan["calibration_seconds_per_step"] > 0
    # the planned iterations are the budget over the measured step time (with the overhead allowance)
    assert plan["iterations"] == max(1, int(0.05 * 60 / (plan["calibration_seconds_per_step"] * 1.08)))
    assert plan["steps"] == plan["iterations"] and not plan["stopped"]
    denoiser = load_denoiser(plan["export"])
    assert denoiser.checkpoint_info["step"] == plan["steps"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["optim"]["iterations"] == plan["iterations"]
