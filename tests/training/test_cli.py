import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from typer.testing import CliRunner

from ctp_node.cli.main import app
from model.checkpoint import load_denoiser
from training.state import config_from_checkpoint, new_state, resume_state
from training.trainer import EXPORT_NAME, LAST_CHECKPOINT

from .helpers import TINY_NETWORK, tiny_config_dict, write_npy_data, write_toml

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def test_train_command_writes_a_loadable_checkpoint_and_tensorboard_events(tmp_path):
    data = write_npy_data(tmp_path / "data")
    config = write_toml(tmp_path / "tiny.toml", tiny_config_dict(data, tmp_path / "ignored"))
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--config", str(config), "--iterations", "2", "--output", str(run), "-q"])
    assert result.exit_code == 0, result.output
    assert "done: 2 steps" in result.output
    net, info = load_denoiser(run / LAST_CHECKPOINT)
    assert info.format == "ctp-node" and info.step == 2
    assert net.config.to_dict() == {**net.config.to_dict(), **TINY_NETWORK}
    assert load_denoiser(run / EXPORT_NAME).info.weights == "model"
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())

    again = runner.invoke(app, ["train", "--resume", str(run / LAST_CHECKPOINT), "--iterations", "3", "-q"])
    assert again.exit_code == 0, again.output
    assert torch.load(run / LAST_CHECKPOINT, weights_only=True)["step"] == 3


def test_train_command_errors_are_messages_not_tracebacks(tmp_path):
    result = runner.invoke(app, ["train", "--config", str(tmp_path / "absent.toml")])
    assert result.exit_code == 2 and "training configuration" in result.output and "does not exist" in result.output
    config = write_toml(tmp_path / "c.toml", tiny_config_dict(tmp_path / "nowhere", tmp_path / "run"))
    result = runner.invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 2 and "nowhere does not exist" in result.output


def test_ctrl_c_finishes_the_step_and_leaves_a_resumable_checkpoint(tmp_path):
    """Ctrl-C in a terminal signals the whole process group, DataLoader workers included."""
    data = write_npy_data(tmp_path / "data")
    run = tmp_path / "run"
    config = write_toml(
        tmp_path / "long.toml",
        tiny_config_dict(data, run, optim={"iterations": 10_000}, runtime={"checkpoint_every": 2, "num_workers": 1}),
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", "from ctp_node.cli.main import app; app()", "train", "--config", str(config)]
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / LAST_CHECKPOINT).exists():  # the first periodic checkpoint: training is under way
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "SIGINT received: stopped after step" in err
    assert f"ctp-node train --resume {run / LAST_CHECKPOINT}" in " ".join(err.split())
    cfg = config_from_checkpoint(run / LAST_CHECKPOINT)
    state = new_state(cfg, torch.device("cpu"))
    resume_state(run / LAST_CHECKPOINT, state, cfg)
    assert 2 <= state.step < 10_000 and state.optimizer.state
