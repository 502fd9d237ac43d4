"""Between the scanner's geometry and the model grid, and back (pipeline stages ``to_model_grid`` /
``from_model_grid``, the functions here of the same names).

The published network sees 8 x 192 x 192 volumes of skull-stripped HU windowed to 0..80 and scaled
to [-1, 1] (docs/model.md, "Data the model sees"). Resampling is done with SimpleITK on images
that carry the series' origin, spacing and direction, so every model voxel has a known position in
patient space and the way back lands on the source voxels.

Brain mask (skull stripping), on the source grid, from the temporal mean of all volumes (noise
falls with the number of volumes; arterial contrast peaks are averaged down below the bone
threshold):

1. bone = mean > ``BONE_HU`` (300 HU);
2. per slice, the region the skull ring encloses (holes of the bone mask), within ``TISSUE_HU``
   (-50..300 HU: no air, fat or bone). Foramina, emissary vessels and thin bone leave gaps in the
   ring; the bone mask is therefore closed in-plane with discs of ``BONE_CLOSING_MM`` (1.5, 3,
   6 mm), and each slice uses the smallest disc whose enclosed area reaches 90 % of the largest
   disc's (a closed ring keeps its detail, a ring with a gap up to about 12 mm is sealed);
3. the largest 3D connected component (face connectivity): the intracranial space;
4. holes filled per slice (dense vessels, calcifications above 300 HU belong to the brain);
5. eroded in-plane by ``erosion_mm`` (default 2 mm) away from the skull, so that partial-volume
   voxels of the inner table are not handed to the model. Erosion is in-plane only: the first and
   last slices are the edge of the scanned coverage, not of the brain.
A slice in which the skull does not form a closed ring (vertex, skull base) gets brain voxels only
where the closing seals the ring; the rest of it is treated as outside the brain, i.e. filled by
temporal interpolation (see ``from_model_grid``). No brain at all raises ``GridError``.

Model grid:

- In-plane: 192 x 192 square pixels of ``fov_mm / 192`` (default 240 mm, 1.25 mm pixels: the
  phantom's default geometry, on which this project trains; the published data's scale is not
  stated), axes parallel to the source's rows and columns, centred on the
  centre of the brain mask's bounding box. A fixed physical field of view keeps the scale the
  network sees independent of the scanner's reconstruction diameter and pixel spacing (anisotropic
  pixels become square); where the scan does not cover the model field of view the model grid is
  padded with -1 (0 HU, outside the brain). A brain wider than ``fov_mm`` raises ``GridError``
  rather than being cut. ``fov_mm=None`` uses the scan's own field of view instead (the longer
  side, centred on the scan, the shorter side padded).
- Through-plane: slices whose spacing lies within ``native_slice_mm`` (default 4..6 mm, the
  "5 mm-ish" slices the model was trained on) are used one to one: model slice k is source slice k
  (same position, no z interpolation). Other spacings are resampled (linear) to
  ``round(coverage / target_slice_mm)`` slices that span exactly the source coverage (thin-slice
  series are thickened, thick ones interpolated) and interpolated back afterwards.
- Slabs: the network takes exactly 8 slices. ``n`` model slices become ``ceil(n / 8)`` slabs of 8;
  when ``n`` is not a multiple of 8 the last slab is moved back to end at the last slice and
  overlaps its neighbour (real slices rather than blank padding, which the network never saw);
  each overlapping slice is taken back from the slab in which it lies farther from the slab's
  edge (ties: the earlier slab). Fewer than 8 slices are padded with -1 (outside the brain) after
  the last slice; the padded slices are discarded on the way back.
- Values: HU clipped to 0..80 on the source grid and resampled by mask-normalised linear
  interpolation (only brain voxels carry weight, so the 0 HU outside cannot darken the brain's
  edge); model pixels outside the brain mask (resampled by nearest neighbour) are exactly -1
  (model space of 0 HU, as in the published skull-stripped data).

The way back (``from_model_grid``) and its filling rule are stated in that function's docstring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ctp_node.errors import GridError
from ctp_node.series import CTPSeries, vessel_fit
from model.planner import FillCounts, FillPlan, SecondFill
from model.window import WINDOW_HIGH_HU, WINDOW_LOW_HU, from_model_space, to_model_space

MODEL_MATRIX = 192
SLAB_SLICES = 8
DEFAULT_FOV_MM = 240.0
BONE_HU = 300.0
TISSUE_HU = (-50.0, 300.0)
BONE_CLOSING_MM = (1.5, 3.0, 6.0)
CLOSING_AREA_FRACTION = 0.9
DEFAULT_EROSION_MM = 2.0
NATIVE_SLICE_MM = (4.0, 6.0)
TARGET_SLICE_MM = 5.0
OUTSIDE = -1.0  # model space of 0 HU: what the published data hold outside the brain


@dataclass(frozen=True)
class GridGeometry:
    """A SimpleITK image grid: ``size`` (x, y, z) voxels, ``origin`` (x, y, z) mm, ``spacing`` (x, y, z)
    mm, ``direction`` 3x3 with columns = index directions (SimpleITK's convention)."""

    size: tuple[int, int, int]
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]  # row-major 3x3, as SimpleITK's GetDirection()

    def image(self, array: np.ndarray | None = None) -> sitk.Image:
        """An image on this grid holding ``array`` (Z, Y, X), or an empty float32 reference image."""
        if array is None:
            img = sitk.Image([int(v) for v in self.size], sitk.sitkFloat32)
        else:
            if array.shape != self.size[::-1]:
                raise ValueError(f"array shape {array.shape} does not match the grid's (Z, Y, X) {self.size[::-1]}")
            img = sitk.GetImageFromArray(array)
        img.SetOrigin(self.origin)
        img.SetSpacing(self.spacing)
        img.SetDirection(self.direction)
        return img

    @classmethod
    def of_series(cls, series: CTPSeries) -> GridGeometry:
        _, n_z, n_y, n_x = series.hu.shape
        dz, dy, dx = series.spacing_mm
        return cls(
            (n_x, n_y, n_z),
            tuple(float(v) for v in series.origin),
            (float(dx), float(dy), float(dz)),
            tuple(float(v) for v in np.asarray(series.direction, dtype=np.float64).ravel()),
        )


@dataclass
class ModelGridSeries:
    """One series on the model grid, and what is needed to go back.

    slabs: per slab, float32 (T, 8, 192, 192) model space [-1, 1], one volume per source volume.
    slab_starts: first model slice of each slab (the last slab may overlap the previous one).
    slab_of_slice / index_in_slab: (n_model_slices,) which slab, and which slice of it, each model
        slice is taken from on the way back.
    brain_mask: bool (Z, Y, X) on the source grid; model_mask: bool (n_model_slices, 192, 192).
    source / model: the two grids (``model.size[2]`` = n_model_slices, padding excluded).
    native_z: True if model slice k is source slice k (no through-plane resampling).
    """

    slabs: list[np.ndarray]
    slab_starts: tuple[int, ...]
    slab_of_slice: np.ndarray
    index_in_slab: np.ndarray
    brain_mask: np.ndarray
    model_mask: np.ndarray
    source: GridGeometry
    model: GridGeometry
    native_z: bool
    times_s: np.ndarray


@dataclass
class SourceSequence:
    """The output of ``from_model_grid``: ``hu`` float32 (T1, Z, Y, X), and the study's ``FillPlan`` with
    each image's voxel counts (model, vessel fit, linear) filled in."""

    hu: np.ndarray
    fill: FillPlan

    @property
    def times_s(self) -> np.ndarray:
        """True time of each image (see ``model.planner.SecondFill.time_s``), strictly increasing."""
        return self.fill.true_times_s


def to_model_grid(
    series: CTPSeries,
    *,
    fov_mm: float | None = DEFAULT_FOV_MM,
    erosion_mm: float = DEFAULT_EROSION_MM,
    native_slice_mm: tuple[float, float] = NATIVE_SLICE_MM,
    target_slice_mm: float = TARGET_SLICE_MM,
) -> ModelGridSeries:
    """Skull-strip, window and resample ``series`` to 8 x 192 x 192 slabs in model space (rules: module docstring)."""
    if fov_mm is not None and not fov_mm > 0:
        raise ValueError(f"fov_mm must be positive (or None for the scan's field of view), got {fov_mm}")
    if not np.all(np.isfinite(series.hu)):
        raise ValueError("the series holds NaN or infinite HU; it cannot be resampled")
    source = GridGeometry.of_series(series)
    brain = brain_mask(np.mean(series.hu, axis=0, dtype=np.float64), series.spacing_mm, erosion_mm=erosion_mm)
    model, native_z = _model_geometry(series, brain, fov_mm, native_slice_mm, target_slice_mm)
    starts, slab_of_slice, index_in_slab = _slab_layout(model.size[2])

    brain_image = source.image(brain.astype(np.float32))
    weight = _resample(brain_image, model, sitk.sitkLinear)
    # The nearest source voxel is one of the linear neighbours, so weight > 0 wherever the mask is set.
    model_mask = (_resample(brain_image, model, sitk.sitkNearestNeighbor) > 0.5) & (weight > 0)
    n_t = series.hu.shape[0]
    slabs = [np.full((n_t, SLAB_SLICES, MODEL_MATRIX, MODEL_MATRIX), OUTSIDE, dtype=np.float32) for _ in starts]
    for t in range(n_t):
        # Window and strip on the source grid first: bone (1000 HU) then cannot bleed into the brain's
        # edge through the linear resampling beyond the window's top (80 HU).
        windowed = np.where(brain, np.clip(series.hu[t], WINDOW_LOW_HU, WINDOW_HIGH_HU), np.float32(0))
        volume = np.full(model.size[::-1], OUTSIDE, dtype=np.float32)
        volume[model_mask] = to_model_space(_masked_linear(windowed, source, model, weight, model_mask))
        for slab, start in zip(slabs, starts):
            stop = min(start + SLAB_SLICES, volume.shape[0])
            slab[t, : stop - start] = volume[start:stop]
    return ModelGridSeries(
        slabs=slabs,
        slab_starts=starts,
        slab_of_slice=slab_of_slice,
        index_in_slab=index_in_slab,
        brain_mask=brain,
        model_mask=model_mask,
        source=source,
        model=model,
        native_z=native_z,
        times_s=np.asarray(series.times_s, dtype=np.float64).copy(),
    )


def from_model_grid(
    grid_series: ModelGridSeries,
    inpainted_slabs: list[np.ndarray],
    fill: FillPlan,
    source: CTPSeries,
    *,
    fit_vessels: bool = True,
) -> SourceSequence:
    """The 1 s sequence on the source grid in full-range HU, float32 (T1, Z, Y, X), and ``fill`` with
    each image's voxel counts (model, vessel fit, linear) for the writer.

    ``inpainted_slabs``: per slab (T1, 8, 192, 192) model space, the engine's sequence for that
    slab; ``fill``: the engine's record of what fills each second (``model.planner.FillPlan``, planned
    on ``source.times_s``). ``fit_vessels=False`` fills every voxel outside the model linearly (the
    rule before vessel fits).

    Time: the engine snaps each acquired volume to its nearest whole second (``model.planner``: the
    volume at 1.5 s sits on second 2), and synthesises the seconds between two such snapped
    seconds l < s < r as the volumes' state at the fraction ``w = (s - l) / (r - l)`` of the way
    from the left volume L to the right one R (its local context says just that). The image of
    second s is therefore placed at the true time ``t_L + w (t_R - t_L)`` (``SecondFill.time_s``),
    and acquired images keep their own acquisition time. With acquisitions on whole seconds nothing
    moves; with irregular ones (every 1.5 s) the synthetic images sit between the acquired ones at
    even fractions of each gap (0, 0.75, 1.5, 3, ... s), so every image's time is the time of what it
    shows and the times increase strictly. The writer states these times (AcquisitionTime).

    Filling rule, per second of the grid:

    - Acquired second (not synthetic, and a usable volume snapped to it; two such volumes: the
      nearer, as the planner keeps): that volume's HU, unchanged, bit for bit, in every voxel. The
      model's copy of it is not used.
    - Synthetic second: L, R and w as above, I = L + w (R - L) the linear interpolation in time
      (at the image's true time). A voxel inside the brain mask whose HU lies within the model's
      window 0..80 in both L and R (the model saw its true values rather than clipped ones) takes
      I plus the model's correction: the model's value minus the same interpolation computed on
      the model grid from the model's own copies of L and R, brought back to the source grid. The
      correction, not the model's value itself, is resampled because the trip to the 192 x 192
      grid and back blurs: a perfect model's values brought back directly were measured 4 HU too
      high in CSF and 0.9 HU too low in grey matter (partial volume with the neighbouring tissue);
      transferred as a correction, a model that returns interpolation gives exactly I, and the
      source's full resolution is kept. The correction at a source voxel is the linear
      interpolation of the model pixels around it that lie inside the model-grid brain mask,
      normalised by their weights: pixels outside that mask get no weight and so cannot pull the
      brain's edge. Every other voxel
      (outside the brain: skull, scalp, vessels outside it; inside it but outside the window in L
      or R: contrast-filled arteries, veins and sinuses above 80 HU, calcifications, air; a
      sub-pixel rim without model pixels) takes the vessel fit where it has one, else I.
    - Vessel fit (``ctp_node.series.vessel_fit``): a voxel whose acquired samples rise at least 40 HU
      (and 6 noise sigmas) above their baseline and that the model does not fill at every second
      gets a gamma-variate
      bolus with recirculation fitted to all its acquired samples at their true times; where the
      fit is credible (that module's criteria), its value at the image's time plus the linearly
      interpolated residuals (so the curve passes exactly through the acquired samples). Voxels
      whose fit is not credible, and all voxels without contrast, take I.
    - Interpolated second (not synthetic and no acquired volume on it: the engine's long-gap
      fallback): the vessel fit where credible, I elsewhere.

    Nothing is extrapolated: the plan covers only seconds between usable acquisitions.
    """
    _check_back_inputs(grid_series, inpainted_slabs, fill, source)
    sources = fill.fills
    n_t1 = len(sources)
    hu = source.hu
    out = np.empty((n_t1, *hu.shape[1:]), dtype=np.float32)
    model_mask = grid_series.model_mask
    weight = _resample(grid_series.model.image(model_mask.astype(np.float32)), grid_series.source, sitk.sitkLinear)
    covered = grid_series.brain_mask & (weight > 0)
    fitted = vessel_fits(hu, source.times_s, fill, covered) if fit_vessels else None
    # the model's copies of the acquired volumes, read from the slabs once for every correction
    acquired_model = {
        src.left: _model_volume(grid_series, inpainted_slabs, g)
        for g, src in enumerate(sources)
        if src.kind == "acquired"
    }
    fills = []
    for g, src in enumerate(sources):
        if src.kind == "acquired":
            out[g] = hu[src.left]
            fills.append(FillCounts(acquired=int(hu[0].size)))
            continue
        left, right = hu[src.left], hu[src.right]
        out[g] = src.interpolate(hu)
        use_model = np.zeros(hu.shape[1:], dtype=bool)
        if src.kind == "synthetic":
            use_model = covered & _in_window(left) & _in_window(right)
            correction = _model_correction(grid_series, inpainted_slabs, g, src, acquired_model)
            out[g][use_model] += _masked_linear(correction, grid_series.model, grid_series.source, weight, use_model)
        n_fit = 0
        if fitted is not None:
            voxels, fit = fitted
            take = ~use_model.reshape(-1)[voxels]
            out[g].reshape(-1)[voxels[take]] = fit.values(src.time_s, np.flatnonzero(take))
            n_fit = int(take.sum())
        n_model = int(use_model.sum())
        fills.append(FillCounts(model=n_model, vessel_fit=n_fit, linear=int(hu[0].size) - n_model - n_fit))
    return SourceSequence(out, fill.with_voxels(fills))


def vessel_fits(
    hu: np.ndarray, times_s: np.ndarray, fill: FillPlan, covered: np.ndarray
) -> tuple[np.ndarray, vessel_fit.FitResult] | None:
    """Flat indices of the voxels with a credible vessel fit, and the fit (rule: ``from_model_grid``)."""
    volumes = list(fill.volumes)
    if len(volumes) < vessel_fit.MIN_SAMPLES:
        return None
    stack = [hu[v] for v in volumes]
    rise = vessel_fit.enhancement(stack)
    always_model = covered.copy()
    for volume in stack:
        always_model &= _in_window(volume)
    noise = vessel_fit.estimate_noise_hu(stack[0], stack[1])
    voxels = np.flatnonzero((rise >= vessel_fit.enhancement_threshold(noise)) & ~always_model)
    if voxels.size == 0:
        return None
    samples = np.stack([volume.reshape(-1)[voxels] for volume in stack])
    fit = vessel_fit.fit_curves(np.asarray(times_s, dtype=np.float64)[volumes], samples, noise)
    keep = fit.accepted
    return voxels[keep], fit.subset(keep)


def brain_mask(
    reference_hu: np.ndarray, spacing_mm: tuple[float, float, float], *, erosion_mm: float = DEFAULT_EROSION_MM
) -> np.ndarray:
    """Skull-stripped brain mask, bool (Z, Y, X), of a reference HU volume (rule: module docstring)."""
    if reference_hu.ndim != 3:
        raise ValueError(f"reference_hu must be (Z, Y, X), got shape {reference_hu.shape}")
    if erosion_mm < 0:
        raise ValueError(f"erosion_mm must be >= 0, got {erosion_mm}")
    _, dy, dx = spacing_mm
    bone = reference_hu > BONE_HU
    low, high = TISSUE_HU
    tissue = (reference_hu > low) & (reference_hu < high)
    enclosed = np.stack([_enclosed(bone[z], tissue[z], (dy, dx)) for z in range(reference_hu.shape[0])])
    labels, count = ndimage.label(enclosed)
    if count == 0:
        raise GridError(
            "no intracranial region found (no tissue enclosed by bone above 300 HU in any slice): "
            "is this a head CT with the skull in the field of view?"
        )
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    mask = labels == int(np.argmax(sizes))
    for z in range(mask.shape[0]):
        mask[z] = ndimage.binary_fill_holes(mask[z])
    if erosion_mm > 0:
        mask = np.stack([_erode(m, erosion_mm, (dy, dx)) for m in mask])
    if not mask.any():
        raise GridError(f"the brain mask is empty after a {erosion_mm:g} mm erosion; lower erosion_mm")
    return mask


def _enclosed(bone: np.ndarray, tissue: np.ndarray, pixel_mm: tuple[float, float]) -> np.ndarray:
    """Tissue enclosed by the skull ring of one slice, sealing gaps with the smallest sufficient closing."""
    if not bone.any():
        return np.zeros_like(bone)
    candidates = []
    for radius in BONE_CLOSING_MM:
        closed = _close(bone, radius, pixel_mm)
        candidates.append(ndimage.binary_fill_holes(closed) & ~closed & tissue)
    largest = candidates[-1].sum()
    return next(c for c in candidates if c.sum() >= CLOSING_AREA_FRACTION * largest)


def _close(mask: np.ndarray, radius_mm: float, pixel_mm: tuple[float, float]) -> np.ndarray:
    """Morphological closing with a disc in millimetres (exact for anisotropic pixels, via distance maps)."""
    dilated = ndimage.distance_transform_edt(~mask, sampling=pixel_mm) <= radius_mm
    return _erode(dilated, radius_mm, pixel_mm)


def _erode(mask: np.ndarray, radius_mm: float, pixel_mm: tuple[float, float]) -> np.ndarray:
    """Pixels farther than ``radius_mm`` from every pixel outside ``mask`` (outside the image counts as outside)."""
    padded = np.pad(mask, 1)
    return (ndimage.distance_transform_edt(padded, sampling=pixel_mm) > radius_mm)[1:-1, 1:-1]


def _model_geometry(
    series: CTPSeries,
    brain: np.ndarray,
    fov_mm: float | None,
    native_slice_mm: tuple[float, float],
    target_slice_mm: float,
) -> tuple[GridGeometry, bool]:
    _, n_z, n_y, n_x = series.hu.shape
    dz, dy, dx = series.spacing_mm
    direction = np.asarray(series.direction, dtype=np.float64)
    if fov_mm is None:
        side = max(n_x * dx, n_y * dy)
        centre_x, centre_y = (n_x - 1) * dx / 2, (n_y - 1) * dy / 2
    else:
        side = float(fov_mm)
        rows, cols = np.nonzero(brain.any(axis=0))
        extent = ((cols.max() - cols.min() + 1) * dx, (rows.max() - rows.min() + 1) * dy)
        if max(extent) > side:
            raise GridError(
                f"the brain mask spans {extent[0]:.0f} x {extent[1]:.0f} mm, more than the model's "
                f"{side:g} mm field of view; raise fov_mm (the model's scale changes) or check the mask"
            )
        centre_x, centre_y = (cols.min() + cols.max()) / 2 * dx, (rows.min() + rows.max()) / 2 * dy
    pixel = side / MODEL_MATRIX
    low, high = native_slice_mm
    native_z = low <= dz <= high
    if native_z:
        n_model_z, model_dz, first_z = n_z, dz, 0.0
    else:
        coverage = n_z * dz
        n_model_z = max(1, round(coverage / target_slice_mm))
        model_dz = coverage / n_model_z
        first_z = -dz / 2 + model_dz / 2  # model slices span the same outer faces as the source's
    half = (MODEL_MATRIX - 1) * pixel / 2
    offset = np.array([centre_x - half, centre_y - half, first_z])  # along the source's index axes
    origin = np.asarray(series.origin, dtype=np.float64) + direction @ offset
    model = GridGeometry(
        (MODEL_MATRIX, MODEL_MATRIX, int(n_model_z)),
        tuple(float(v) for v in origin),
        (pixel, pixel, float(model_dz)),
        tuple(float(v) for v in direction.ravel()),
    )
    return model, native_z


def _slab_layout(n_slices: int) -> tuple[tuple[int, ...], np.ndarray, np.ndarray]:
    """Slab starts, and for each model slice the slab (and position in it) it is taken back from."""
    count = math.ceil(n_slices / SLAB_SLICES)
    starts = [i * SLAB_SLICES for i in range(count)]
    if n_slices >= SLAB_SLICES:
        starts[-1] = n_slices - SLAB_SLICES
    slab_of_slice = np.zeros(n_slices, dtype=np.int64)
    index_in_slab = np.zeros(n_slices, dtype=np.int64)
    for k in range(n_slices):
        best, best_depth = -1, -1
        for s, start in enumerate(starts):
            pos = k - start
            if 0 <= pos < SLAB_SLICES:
                depth = min(pos, SLAB_SLICES - 1 - pos)  # distance from the slab's edge
                if depth > best_depth:
                    best, best_depth = s, depth
        slab_of_slice[k], index_in_slab[k] = best, k - starts[best]
    return tuple(starts), slab_of_slice, index_in_slab


def _resample(image: sitk.Image, grid: GridGeometry, interpolator: int) -> np.ndarray:
    """``image`` sampled at the voxel centres of ``grid`` (points outside it: 0), as (Z, Y, X) float32."""
    out = sitk.Resample(image, grid.image(), sitk.Transform(), interpolator, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def _masked_linear(
    values: np.ndarray, grid: GridGeometry, target: GridGeometry, weight: np.ndarray, where: np.ndarray
) -> np.ndarray:
    """Linear interpolation of ``values`` (zero outside a mask) normalised by ``weight``, the mask itself
    interpolated the same way: voxels outside the mask get no weight, so they cannot darken the
    brain's edge. Returns the values at ``where`` (where ``weight`` > 0)."""
    resampled = _resample(grid.image(np.ascontiguousarray(values, dtype=np.float32)), target, sitk.sitkLinear)
    return resampled[where] / weight[where]


def _model_volume(grid_series: ModelGridSeries, slabs: list[np.ndarray], g: int) -> np.ndarray:
    """Second ``g`` of the inpainted slabs in HU 0..80 on the model grid, 0 outside its brain mask."""
    n_model_z = grid_series.model.size[2]
    volume = np.empty((n_model_z, MODEL_MATRIX, MODEL_MATRIX), dtype=np.float32)
    for k in range(n_model_z):
        volume[k] = slabs[grid_series.slab_of_slice[k]][g, grid_series.index_in_slab[k]]
    # With native slices the model slices sit on the source slices, so the z weights are 0 or 1 (to
    # floating-point rounding): only the in-plane interpolation acts.
    return np.where(grid_series.model_mask, from_model_space(np.clip(volume, -1.0, 1.0)), np.float32(0))


def _model_correction(
    grid_series: ModelGridSeries,
    slabs: list[np.ndarray],
    g: int,
    src: SecondFill,
    acquired_model: dict[int, np.ndarray],
) -> np.ndarray:
    """What the model changes at second ``g`` relative to interpolation on the model grid, HU, 0
    outside the model's brain mask (rule: ``from_model_grid``). ``acquired_model``: the model's
    copies of the acquired volumes (the engine's inputs at their snapped seconds), by source index."""
    if src.left not in acquired_model or src.right not in acquired_model:
        raise ValueError(f"second {g}: its bracketing volumes {src.left}, {src.right} are not on the model grid")
    return _model_volume(grid_series, slabs, g) - src.interpolate(acquired_model)


def _in_window(hu: np.ndarray) -> np.ndarray:
    return (hu >= WINDOW_LOW_HU) & (hu <= WINDOW_HIGH_HU)


def _check_back_inputs(
    grid_series: ModelGridSeries, slabs: list[np.ndarray], fill: FillPlan, source: CTPSeries
) -> None:
    n_t1 = len(fill.fills)
    if source.hu.shape[1:] != grid_series.source.size[::-1]:
        raise ValueError(
            f"the source is {source.hu.shape[1:]} (Z, Y, X) but the model grid was built from "
            f"{grid_series.source.size[::-1]}: pass the series given to to_model_grid"
        )
    if fill.input_second.shape != source.times_s.shape:
        raise ValueError(
            f"the plan was made for {fill.input_second.size} volumes, the source has {source.times_s.size}: "
            "pass the engine's plan of this series"
        )
    if len(slabs) != len(grid_series.slab_starts):
        raise ValueError(f"got {len(slabs)} inpainted slabs, the grid has {len(grid_series.slab_starts)}")
    expected = (n_t1, SLAB_SLICES, MODEL_MATRIX, MODEL_MATRIX)
    for i, slab in enumerate(slabs):
        if np.shape(slab) != expected:
            raise ValueError(f"inpainted slab {i} has shape {np.shape(slab)}, expected {expected} (T1 = grid seconds)")
