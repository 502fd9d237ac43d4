"""An autouse fixture for suites that train or run the network on CPU: they share 2 busy cores with
other suites, and one intra-op thread avoids oversubscription. A directory's conftest imports it."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
