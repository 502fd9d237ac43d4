"""Perfusion analysis of CT perfusion series: CBF, CBV, MTT, Tmax, TTP, core and hypoperfusion.

Its errors (``PerfusionError``, ``NoAIFError``) are in the node's one hierarchy, ``ctp_node.errors``.
"""

from ctp_node.perfusion.aif import AIFSelection, VesselCurve
from ctp_node.perfusion.maps import DEFAULT_K, PerfusionMaps, PerfusionSettings, compute_perfusion

__all__ = [
    "AIFSelection",
    "DEFAULT_K",
    "PerfusionMaps",
    "PerfusionSettings",
    "VesselCurve",
    "compute_perfusion",
]
