"""Errors of the perfusion analysis: input faults of the node's one hierarchy (``ctp_node.errors``).

Kept importable from here, where the perfusion modules have always found them.
"""

from __future__ import annotations

from ctp_node.errors import NoAIFError, PerfusionError

__all__ = ["NoAIFError", "PerfusionError"]
