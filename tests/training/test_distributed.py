import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from training.trainer import LAST_CHECKPOINT

from .helpers import tiny_config_dict, write_npy_data, write_toml

REPO = Path(__file__).resolve().parents[2]

WORKER = """
import os, sys
from pathlib import Path
import torch
from training.config import load_config
from training.trainer import train

config = load_config(sys.argv[1])

def dump(state):
    if state.step == config.optim.iterations:
        params = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
        torch.save({"pid": os.getpid(), "params": params}, Path(sys.argv[2]) / f"rank{os.environ['RANK']}.pt")

result = train(config, callback=dump)
print(f"rank {os.environ['RANK']} step {result.step} checkpoint {result.checkpoint}")
"""


def test_two_process_ddp_on_cpu_stays_in_sync_and_only_rank0_writes(tmp_path):
    data = write_npy_data(tmp_path / "data")
    run = tmp_path / "run"
    config = write_toml(
        tmp_path / "ddp.toml",
        tiny_config_dict(data, run, optim={"iterations": 2, "batch_size": 2}, runtime={"checkpoint_every": 1}),
    )
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*launcher, str(script), str(config), str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0 step 2 checkpoint " + str(run / LAST_CHECKPOINT) in proc.stdout
    assert "rank 1 step 2 checkpoint None" in proc.stdout

    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["pid"] != rank1["pid"]
    for key, value in rank0["params"].items():  # DDP kept the replicas identical
        torch.testing.assert_close(value, rank1["params"][key], rtol=0, atol=0)

    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]
    saved = torch.load(run / LAST_CHECKPOINT, weights_only=True)
    assert saved["step"] == 2 and not any(k.startswith("module.") for k in saved["model"])
    for key, value in saved["model"].items():
        torch.testing.assert_close(value, rank0["params"][key], rtol=0, atol=0)
    rng = saved["training"]["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["cpu"], rng[1]["cpu"])  # each rank its own noise
    events = list((run / "tensorboard").iterdir())
    assert len(events) == 1 and re.search(rf"\.{rank0['pid']}\.", events[0].name)  # written by rank 0 only
