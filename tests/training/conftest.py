"""The training tests run the network on CPU: one torch intra-op thread (tests/torch_threads.py)."""

from tests.torch_threads import one_torch_thread  # noqa: F401  (autouse fixture)
