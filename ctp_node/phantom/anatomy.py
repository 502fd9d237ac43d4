"""An analytic head: tissue labels at any point of patient space.

Shapes are defined in millimetres in the patient (LPS) frame of an upright head whose centre is at
x = y = 0 and whose basal ganglia lie at z = 0: scalp, a 7 mm skull, subarachnoid CSF, a folded
cortical ribbon with CSF-filled sulci, white matter, deep grey nuclei, lateral and third ventricles,
the interhemispheric and Sylvian fissures, internal carotid, middle and anterior cerebral arteries,
and the superior sagittal and transverse sinuses. With a lesion, the M2 branches on its side are
occluded and fill late through collaterals. Because every structure is a function of position,
the same code renders the head on any grid, including rigidly moved ones (motion simulation), and
at any resolution. Voxels are point-sampled at their centres (no through-slice partial volume).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctp_node.phantom.tissue import TissueLabel

# Head geometry (mm); PhantomConfig reads it to check lesion placement.
INTRACRANIAL_SEMI_AXES_MM = (63.0, 83.0, 88.0)
HEAD_CENTRE_Z_MM = 10.0
MCA_TERRITORY_MIN_ABS_X_MM = 12.0

SCALP_SEMI_AXES_MM = (75.0, 95.0, 100.0)
SKULL_SEMI_AXES_MM = (70.0, 90.0, 95.0)

# Vessel curve kinds (which enhancement curve a vessel voxel follows). COLLATERAL_ARTERY: the M2
# branches beyond the occlusion that causes the lesion, filled late and dispersed via collaterals.
NO_VESSEL, PROXIMAL_ARTERY, DISTAL_ARTERY, SINUS, COLLATERAL_ARTERY = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class Lesion:
    """Ischaemic core and penumbra (spheres) within one hemisphere's MCA territory."""

    centre_mm: tuple[float, float, float]
    core_radius_mm: float
    penumbra_radius_mm: float


@dataclass(frozen=True)
class Vessel:
    """A tube of ``radius_mm`` around a polyline of ``points_mm`` (x, y, z)."""

    points_mm: tuple[tuple[float, float, float], ...]
    radius_mm: float
    kind: int
    mca_branch: bool = False  # beyond the M1: occluded on the side of a lesion

    def kind_with(self, lesion: Lesion | None) -> int:
        """The curve this vessel follows: M2 branches on the lesion's side fill via collaterals."""
        if lesion is not None and self.mca_branch and np.sign(self.points_mm[-1][0]) == np.sign(lesion.centre_mm[0]):
            return COLLATERAL_ARTERY
        return self.kind


def _mirror(points: tuple[tuple[float, float, float], ...]) -> tuple[tuple[float, float, float], ...]:
    return tuple((-x, y, z) for x, y, z in points)


def _sinus_points() -> tuple[tuple[float, float, float], ...]:
    angles = np.radians(np.linspace(-25.0, 150.0, 15))
    return tuple((0.0, float(80.0 * np.cos(a)), float(HEAD_CENTRE_Z_MM + 84.0 * np.sin(a))) for a in angles)


def _vessels() -> tuple[Vessel, ...]:
    left = [
        Vessel(((15, -12, -70), (15, -12, -12)), 2.2, PROXIMAL_ARTERY),  # internal carotid
        Vessel(((15, -12, -12), (40, -10, -8)), 1.6, PROXIMAL_ARTERY),  # M1
        Vessel(((40, -10, -8), (44, -6, 10), (47, 0, 35), (45, 10, 60)), 1.2, DISTAL_ARTERY, True),  # M2 superior
        Vessel(((40, -10, -8), (46, 15, 5), (50, 35, 20), (48, 50, 45)), 1.0, DISTAL_ARTERY, True),  # M2 inferior
        Vessel(((15, -12, -12), (2.5, -25, -10), (2.5, -45, 10), (2.5, -35, 40), (2.5, 0, 62)), 1.2, DISTAL_ARTERY),
        Vessel(((0, 72, -26), (40, 66, -30), (56, 40, -36)), 3.0, SINUS),  # transverse sinus
    ]
    mirrored = [Vessel(_mirror(v.points_mm), v.radius_mm, v.kind, v.mca_branch) for v in left]
    return (*left, *mirrored, Vessel(_sinus_points(), 3.5, SINUS))


VESSELS = _vessels()


@dataclass(frozen=True)
class Grid:
    """Voxel centres of a (Z, Y, X) array in patient space: ``p = affine[:, :3] @ (i, j, k) + affine[:, 3]``
    with (i, j, k) = (column, row, slice) indices, as in DICOM/ITK."""

    shape: tuple[int, int, int]
    affine: np.ndarray  # (3, 4)

    def coords(self, box: tuple[slice, slice, slice] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """float32 (x, y, z) arrays over the grid or over ``box`` (slices along Z, Y, X)."""
        box = box or tuple(slice(0, n) for n in self.shape)
        k, j, i = (np.arange(s.start, s.stop, dtype=np.float32) for s in box)
        k, j, i = k[:, None, None], j[None, :, None], i[None, None, :]
        a = self.affine.astype(np.float32)
        return tuple(a[r, 0] * i + a[r, 1] * j + a[r, 2] * k + a[r, 3] for r in range(3))  # type: ignore[return-value]

    def box_around(self, low_mm: np.ndarray, high_mm: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index slices covering the patient-space box [low, high] (None if it misses the grid)."""
        corners = np.array(np.meshgrid(*zip(low_mm, high_mm, strict=True), indexing="ij")).reshape(3, -1)
        ijk = np.linalg.solve(self.affine[:, :3], corners - self.affine[:, 3:4])
        lo = np.maximum(np.floor(ijk.min(axis=1)).astype(int), 0)
        hi = np.minimum(np.ceil(ijk.max(axis=1)).astype(int) + 1, self.shape[::-1])
        if np.any(hi <= lo):
            return None
        return (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))


def _ellipsoid(x, y, z, semi, centre=(0.0, 0.0, HEAD_CENTRE_Z_MM)) -> np.ndarray:
    """Normalised ellipsoid radius (1 on the surface)."""
    return np.sqrt(
        ((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2 + ((z - centre[2]) / semi[2]) ** 2
    )


def _depth_mm(x, y, z) -> np.ndarray:
    """Approximate distance (mm) below the inner table of the skull (negative outside)."""
    a, b, c = INTRACRANIAL_SEMI_AXES_MM
    zc = z - HEAD_CENTRE_Z_MM
    r = np.sqrt((x / a) ** 2 + (y / b) ** 2 + (zc / c) ** 2)
    gradient = np.sqrt((x / a**2) ** 2 + (y / b**2) ** 2 + (zc / c**2) ** 2) / np.maximum(r, 1e-6)
    return (1.0 - r) / np.maximum(gradient, 1e-6)


def head_labels(grid: Grid, lesion: Lesion | None) -> tuple[np.ndarray, np.ndarray]:
    """(labels uint8 (Z, Y, X) of ``TissueLabel``, vessel kind uint8 (Z, Y, X)) on ``grid``."""
    x, y, z = grid.coords()
    labels = np.full(grid.shape, TissueLabel.AIR, dtype=np.uint8)
    labels[_ellipsoid(x, y, z, SCALP_SEMI_AXES_MM) < 1] = TissueLabel.SOFT_TISSUE
    labels[_ellipsoid(x, y, z, SKULL_SEMI_AXES_MM) < 1] = TissueLabel.BONE
    depth = _depth_mm(x, y, z)
    _brain(labels, x, y, z, depth)
    if lesion is not None:
        _lesion(labels, x, y, z, lesion)
    vessel_kind = np.zeros(grid.shape, dtype=np.uint8)
    for vessel in VESSELS:
        _draw_vessel(grid, vessel, vessel.kind_with(lesion), labels, vessel_kind)
    return labels, vessel_kind


def _brain(labels: np.ndarray, x, y, z, depth) -> None:
    """Cortex, sulci, white matter, deep grey matter, ventricles and fissures (in place)."""
    theta = np.arctan2(y / INTRACRANIAL_SEMI_AXES_MM[1], x / INTRACRANIAL_SEMI_AXES_MM[0])
    fold = np.sin(22.0 * theta + 0.15 * z + 2.0 * np.sin(5.0 * theta + 0.07 * z) + 0.8 * np.sin(0.1 * depth))
    inside = depth > 0
    grey = (depth < 6.0) | ((fold > 0.35) & (depth < 17.0))
    csf = (depth < 1.5) | ((fold > 0.9) & (depth < 13.0))
    medial = (y < -20) | (y > 30) | (z > 35)
    ax = np.abs(x)
    csf |= medial & (ax < 1.5)  # interhemispheric fissure
    grey |= medial & (ax < 4.5)  # medial cortex
    csf |= (ax > 38) & (ax < 50) & (np.abs(y + 8) < 2.5) & (z > -20) & (z < 15)  # Sylvian fissures
    for side in (-1.0, 1.0):
        grey |= _ellipsoid(x, y, z, (7.0, 16.0, 12.0), (side * 22.0, -4.0, 2.0)) < 1  # lentiform nucleus
        grey |= _ellipsoid(x, y, z, (8.0, 11.0, 9.0), (side * 10.0, 14.0, 2.0)) < 1  # thalamus
        csf |= _ellipsoid(x, y, z, (6.0, 30.0, 9.0), (side * 9.0, 0.0, 12.0)) < 1  # lateral ventricle
    csf |= _ellipsoid(x, y, z, (2.5, 12.0, 8.0), (0.0, 8.0, -2.0)) < 1  # third ventricle
    tissue = np.where(csf, TissueLabel.CSF, np.where(grey, TissueLabel.GREY_MATTER, TissueLabel.WHITE_MATTER))
    np.copyto(labels, tissue.astype(np.uint8), where=inside)


def _lesion(labels: np.ndarray, x, y, z, lesion: Lesion) -> None:
    """Turn GM/WM of the lesion's MCA territory into core and penumbra classes (in place)."""
    cx, cy, cz = lesion.centre_mm
    distance = np.sqrt((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2)
    territory = (np.sign(x) == np.sign(cx)) & (np.abs(x) > MCA_TERRITORY_MIN_ABS_X_MM) & (y > -60) & (y < 55)
    core = territory & (distance < lesion.core_radius_mm)
    penumbra = territory & (distance < lesion.penumbra_radius_mm) & ~core
    grey, white = labels == TissueLabel.GREY_MATTER, labels == TissueLabel.WHITE_MATTER
    labels[core & grey] = TissueLabel.GM_CORE
    labels[core & white] = TissueLabel.WM_CORE
    labels[penumbra & grey] = TissueLabel.GM_PENUMBRA
    labels[penumbra & white] = TissueLabel.WM_PENUMBRA


def _draw_vessel(grid: Grid, vessel: Vessel, kind: int, labels: np.ndarray, vessel_kind: np.ndarray) -> None:
    """Label voxels within ``radius_mm`` of the polyline; only the bounding box of each segment is computed."""
    label = TissueLabel.VEIN if vessel.kind == SINUS else TissueLabel.ARTERY
    points = np.asarray(vessel.points_mm, dtype=np.float64)
    for a, b in zip(points[:-1], points[1:], strict=True):
        box = grid.box_around(np.minimum(a, b) - vessel.radius_mm, np.maximum(a, b) + vessel.radius_mm)
        if box is None:
            continue
        x, y, z = grid.coords(box)
        d = (b - a).astype(np.float32)
        s = np.clip(((x - a[0]) * d[0] + (y - a[1]) * d[1] + (z - a[2]) * d[2]) / np.float32(d @ d), 0, 1)
        dist2 = (x - a[0] - s * d[0]) ** 2 + (y - a[1] - s * d[1]) ** 2 + (z - a[2] - s * d[2]) ** 2
        hit = dist2 < vessel.radius_mm**2
        labels[box][hit] = label
        vessel_kind[box][hit] = kind
