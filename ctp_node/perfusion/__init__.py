"""Perfusion analysis of CT perfusion series: CBF, CBV, MTT, Tmax, TTP, core and hypoperfusion."""

from ctp_node.perfusion.aif import AIFSelection, VesselCurve
from ctp_node.perfusion.errors import NoAIFError, PerfusionError
from ctp_node.perfusion.maps import DEFAULT_K, PerfusionMaps, PerfusionSettings, compute_perfusion

__all__ = [
    "AIFSelection",
    "DEFAULT_K",
    "NoAIFError",
    "PerfusionError",
    "PerfusionMaps",
    "PerfusionSettings",
    "VesselCurve",
    "compute_perfusion",
]
