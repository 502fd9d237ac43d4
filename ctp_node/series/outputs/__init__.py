"""Perfusion outputs the stroke team reads in PACS: quantitative and colour maps, SR volumes, SEG masks, QA report.

Entry point: ``write_perfusion_outputs(data, out_dir, settings)``; input: ``PerfusionOutputInput``
(``output_input`` builds it from ``compute_perfusion`` results). All outputs are research use only.
"""

from ctp_node.series.outputs.common import OutputSeries
from ctp_node.series.outputs.inputs import (
    AnalysisKind,
    PerfusionAnalysis,
    PerfusionOutputInput,
    TissueCurves,
    analysis_from_maps,
    mean_tissue_curves,
    output_input,
)
from ctp_node.series.outputs.writer import write_perfusion_outputs

__all__ = [
    "AnalysisKind",
    "OutputSeries",
    "PerfusionAnalysis",
    "PerfusionOutputInput",
    "TissueCurves",
    "analysis_from_maps",
    "mean_tissue_curves",
    "output_input",
    "write_perfusion_outputs",
]
