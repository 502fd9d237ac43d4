import os
import signal
from pathlib import Path

import pytest

from tests.peers import wait_for
from training.datasets import DataError, npy_datasets
from training.loader import BatchStream, TupleSampler

from .helpers import tiny_config, write_npy_data


def worker_pids() -> list[int]:
    """Forked children of this process (DataLoader workers share our command line)."""
    me = os.getpid()
    children = Path(f"/proc/{me}/task/{me}/children").read_text().split()
    cmdline = Path(f"/proc/{me}/cmdline").read_bytes()
    return [int(pid) for pid in children if Path(f"/proc/{pid}/cmdline").read_bytes() == cmdline]


def sigint_pending(pid: int) -> bool:
    """SIGINT generated for ``pid`` but not yet delivered (False once the process is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    masks = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(mask & (1 << (signal.SIGINT - 1)) for mask in masks)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_dataloader_workers_survive_ctrl_c_so_the_main_process_can_stop_cleanly(tmp_path):
    train, _ = npy_datasets(tiny_config(write_npy_data(tmp_path / "data"), tmp_path / "run").data)
    stream = BatchStream(train, 2, sampler=TupleSampler(train.weights()), num_workers=1)
    batches = iter(stream)
    next(batches)
    workers = worker_pids()
    assert workers
    for pid in workers:  # what a terminal's Ctrl-C does to every process of the group
        os.kill(pid, signal.SIGINT)
    # Go on once every worker has taken the signal (none pending: ignored, handled, or the worker is
    # gone), so that a worker it killed shows in the batches below.
    wait_for(lambda: not any(sigint_pending(pid) for pid in workers), 10, "the workers to take SIGINT")
    for _ in range(40):  # more than the prefetched batches: a dead worker raises "exited unexpectedly"
        next(batches)
    state = stream.state_dict()
    assert state["epoch"] * (len(train) // 2) + state["position"] == 41
    del batches


def test_an_epoch_smaller_than_the_batch_is_refused(tmp_path):
    train, _ = npy_datasets(tiny_config(write_npy_data(tmp_path / "data", n_train=1), tmp_path / "run").data)
    with pytest.raises(
        DataError, match=r"one epoch holds \d+ training tuples per process, fewer than the batch of 500"
    ):
        BatchStream(train, 500, sampler=TupleSampler(train.weights()))
