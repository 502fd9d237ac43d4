"""The progress callback every long step of the model and the node reports through.

``progress(done, total)``: ``done`` of ``total`` units (sampler steps, volumes, files) finished. A
module of its own, without torch, so that the node's light paths (the phantom's writers, the SCU) can
name the type without importing the network.
"""

from __future__ import annotations

from collections.abc import Callable

ProgressFn = Callable[[int, int], None]
