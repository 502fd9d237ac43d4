"""Analytic test heads for the series tests: a ring of skull around a cylinder of brain, in air."""

from __future__ import annotations

import numpy as np

from ctp_node.phantom.sampling import SCAN_START
from ctp_node.series import CTPSeries

BRAIN_HU, VESSEL_HU, DARK_HU, BONE_HU, SCALP_HU, AIR_HU = 30.0, 150.0, -20.0, 1000.0, 40.0, -1000.0


def ring_head(
    shape_zyx: tuple[int, int, int] = (8, 160, 160),
    spacing_zyx: tuple[float, float, float] = (5.0, 1.25, 1.25),
    times_s: tuple[float, ...] = (0.0, 4.0),
    brain_radius_mm: float = 70.0,
    centre_mm: tuple[float, float] = (0.0, 0.0),
) -> CTPSeries:
    """An analytic axial head: a cylinder of brain (30 HU + 2 HU per second) inside a 6 mm skull ring
    (1000 HU) and 4 mm of scalp, in air; inside the brain a 'vessel' block at 150 HU and a dark block at
    -20 HU (both outside the 0..80 window), 20 mm wide, centred 30 mm right and left of the centre."""
    n_z, n_y, n_x = shape_zyx
    dz, dy, dx = spacing_zyx
    origin = (-(n_x - 1) * dx / 2, -(n_y - 1) * dy / 2, 0.0)
    x = origin[0] + np.arange(n_x) * dx - centre_mm[0]
    y = origin[1] + np.arange(n_y) * dy - centre_mm[1]
    r = np.hypot(x[None, :], y[:, None])
    image = np.full((n_y, n_x), AIR_HU, dtype=np.float32)
    image[r < brain_radius_mm + 10] = SCALP_HU
    image[r < brain_radius_mm + 6] = BONE_HU
    image[r < brain_radius_mm] = BRAIN_HU
    near = np.abs(y[:, None]) < 10
    image[near & (np.abs(x[None, :] - 30) < 10)] = VESSEL_HU
    image[near & (np.abs(x[None, :] + 30) < 10)] = DARK_HU
    volume = np.broadcast_to(image, (n_z, n_y, n_x))
    brain = (volume == BRAIN_HU).astype(np.float32)
    hu = np.stack([volume + np.float32(2.0 * t) * brain for t in times_s]).astype(np.float32)
    return CTPSeries(
        hu=hu,
        times_s=np.asarray(times_s, dtype=np.float64),
        origin=origin,
        spacing_mm=spacing_zyx,
        direction=np.eye(3),
        start=SCAN_START,
    )
