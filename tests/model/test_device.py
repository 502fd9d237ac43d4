import pytest
import torch

from model.device import GIB, auto_batch_size, autocast_dtype, balanced_batch, batch_from_memory, choose_device


@pytest.mark.parametrize(
    ("n", "fit", "expected"),
    [(45, 32, 23), (45, 45, 45), (45, 100, 45), (45, 1, 1), (45, 4, 4), (10, 3, 3), (7, 6, 4)],
)
def test_balanced_batch(n, fit, expected):
    assert balanced_batch(n, fit) == expected


def test_batch_from_memory_extrapolates_linearly():
    # 1 GiB fixed + 0.5 GiB per volume; 20 GiB allowed -> (18 - 1) / 0.5 = 34 volumes
    peak1, peak2 = int(1.5 * GIB), 2 * GIB
    assert batch_from_memory(peak1, peak2, free_bytes=80 * GIB, budget_bytes=20 * GIB) == 34
    # less free memory than the budget wins
    assert batch_from_memory(peak1, peak2, free_bytes=6 * GIB, budget_bytes=20 * GIB) == 8
    # never below one
    assert batch_from_memory(peak1, peak2, free_bytes=GIB // 2, budget_bytes=20 * GIB) == 1


def test_cpu_batch_is_balanced():
    assert auto_batch_size(lambda b: None, torch.device("cpu"), 45, cpu_batch=4) == 4
    assert auto_batch_size(lambda b: None, torch.device("cpu"), 5, cpu_batch=4) == 3


def test_device_choice():
    assert choose_device("cpu") == torch.device("cpu")
    assert choose_device(None).type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        assert choose_device("auto") == torch.device("cpu")
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            choose_device("cuda")


def test_precision_defaults():
    assert autocast_dtype(torch.device("cpu"), "auto") is None
    assert autocast_dtype(torch.device("cuda"), "auto") is torch.bfloat16
    assert autocast_dtype(torch.device("cuda"), "fp32") is None
    assert autocast_dtype(torch.device("cpu"), "bf16") is torch.bfloat16
