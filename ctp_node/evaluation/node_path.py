"""One series through the node's own path, without DICOM: model grid -> inpaint -> scanner geometry.

The same stages as ``ctp_node.series.pipeline.SeriesPipeline.run`` between assembling and writing, so an
evaluation measures what a PACS would receive (vessels, bone and voxels outside the model's window
filled as the node fills them).

``grid_linear`` runs the same path with the network replaced by linear interpolation of the
model-grid volumes: what the path itself costs (resampling to the 1.25 mm model grid and back, the
window, the brain mask), with no model error. On a static series it is the best any network can do.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ctp_node.series import CTPSeries
from ctp_node.series.grid import ModelGridSeries, from_model_grid, to_model_grid
from model.baseline import linear_inpaint
from model.engine import Inpainter

# (model-grid series) -> (per slab (T1, 8, 192, 192) model space, grid times (T1,), synthetic (T1,))
FillFn = Callable[[ModelGridSeries], tuple[list[np.ndarray], np.ndarray, np.ndarray]]


@dataclass
class NodeOutput:
    """The 1 s series on the source grid and what the node decided on the way."""

    hu: np.ndarray  # float32 (T1, Z, Y, X) HU
    times_s: np.ndarray  # (T1,) seconds, same clock as the series
    synthetic: np.ndarray  # (T1,) bool: seconds the model sampled
    brain_mask: np.ndarray  # (Z, Y, X) bool: the node's skull-stripped mask (what the model may change)
    inpaint_s: float = 0.0  # wall-clock seconds of the filling (the network's part)


def _through_grid(series: CTPSeries, fill: FillFn) -> NodeOutput:
    grid = to_model_grid(series)
    start = time.perf_counter()
    slabs, times, synthetic = fill(grid)
    inpaint_s = time.perf_counter() - start
    hu = from_model_grid(grid, slabs, synthetic, series, times)
    return NodeOutput(hu, np.asarray(times), np.asarray(synthetic), grid.brain_mask, inpaint_s)


def node_inpaint(engine: Inpainter, series: CTPSeries) -> NodeOutput:
    """The node's output for ``series`` with ``engine``'s network."""

    def fill(grid: ModelGridSeries):
        results = engine.inpaint_many(grid.slabs, series.times_s)
        first = results[0]
        return [r.sequence for r in results], first.times_s, first.synthetic

    return _through_grid(series, fill)


def grid_linear(series: CTPSeries) -> NodeOutput:
    """The node's path with linear interpolation on the model grid in place of the network."""

    def fill(grid: ModelGridSeries):
        filled = [linear_inpaint(slab, series.times_s) for slab in grid.slabs]
        return [f[0] for f in filled], filled[0][1], filled[0][2]

    return _through_grid(series, fill)
