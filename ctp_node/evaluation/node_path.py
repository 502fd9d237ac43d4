"""One series through the node's own path, without DICOM: model grid -> inpaint -> scanner geometry.

``ctp_node.series.pipeline.run_series`` itself, without writing and without the guardrail (these are
the model's own synthetic seconds), so an evaluation measures what a PACS would receive (vessels,
bone and voxels outside the model's window filled as the node fills them).

``grid_linear`` runs the same path with the network replaced by linear interpolation of the
model-grid volumes (``model.engine.LinearInpainter``): what the path itself costs (resampling to the
1.25 mm model grid and back, the window, the brain mask), with no model error. On a static series it
is the best any network can do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctp_node.config import GuardrailSettings
from ctp_node.series import CTPSeries
from ctp_node.series.pipeline import SeriesPipeline, run_series
from model.engine import LinearInpainter, StudyInpainter


@dataclass
class NodeOutput:
    """The 1 s series on the source grid and what the node decided on the way."""

    hu: np.ndarray  # float32 (T1, Z, Y, X) HU
    times_s: np.ndarray  # (T1,) seconds, same clock as the series
    synthetic: np.ndarray  # (T1,) bool: seconds the model sampled
    brain_mask: np.ndarray  # (Z, Y, X) bool: the node's skull-stripped mask (what the model may change)
    inpaint_s: float = 0.0  # wall-clock seconds of the filling (the network's part)


def node_inpaint(engine: StudyInpainter, series: CTPSeries) -> NodeOutput:
    """The node's output for ``series`` with ``engine`` (an ``Inpainter``, or any engine of that protocol)."""
    pipeline = SeriesPipeline(engine, guardrail=GuardrailSettings(policy="off"), min_time_points=2)
    result = run_series(pipeline, series)
    return NodeOutput(result.hu, result.times_s, result.synthetic, result.brain_mask, result.seconds["inpaint"])


def grid_linear(series: CTPSeries) -> NodeOutput:
    """The node's path with linear interpolation on the model grid in place of the network."""
    return node_inpaint(LinearInpainter(), series)
