"""Head motion: rigid registration of every volume to the baseline, and the volumes it cannot rescue.

``correct_motion(series, settings) -> MotionResult``. Stages, each a small function:

1. Anchor images: every volume in a bone window (``bone_hu``, skull 1000+ HU), averaged in-plane to
   about ``registration_pixel_mm``. The skull is the anchor because it moves rigidly with the brain,
   does not enhance (the metric sees the same intensities at every time point, so mean squares is
   exact and fast, with no need for mutual information's histogram), and its edges are sharp and
   present in every slice. Enhancing vessels stay below the window (arteries peak at a few hundred
   HU in CTP), and the metric is evaluated only on a mask around the reference skull.
2. Reference: the voxelwise median of the first ``reference_volumes`` volumes (pre-contrast; the
   median ignores one moved volume among three).
3. Registration (SimpleITK, Euler 3-D, mean squares on every mask voxel, regular-step gradient
   descent, two levels) of each volume whose anchor differs from the reference by more than noise,
   from the reference pose (retried from its predecessor's pose when it ends far worse than the
   others: a head that moved and stayed).
   A volume that moved more than ``min_correction_mm`` anywhere on the skull is resampled onto the
   reference grid (``interpolation``, linear by default; nearest extrapolation at the slab faces); a still volume is
   copied unchanged, so a still series comes out bit-identical.
4. Detection, each criterion physical *and* a robust outlier (median/MAD z-score > ``outlier_z``)
   against the series itself, so that neither noise nor a study-wide feature flags volumes:
   - residual misalignment: the anchor residual after registration (both smoothed to about 4 mm)
     exceeds, above the series' typical residual and the volume's own interpolation floor, the
     residual a rigid in-plane shift of ``max_misalignment_mm`` produces on the reference (blur of
     motion within a volume, a failed registration);
   - slice discontinuity: slices of one volume disagree about the head's position (in-plane shift
     per slice, Gauss-Newton on the anchor) by more than ``max_misalignment_mm``, or some slices
     (not most) carry the residual misalignment above (head moved between slices; a shifted slice);
   - baseline outlier: a pre-contrast volume whose mean brain HU differs from the other baseline
     volumes' by more than ``baseline_offset_hu``, or whose RMS difference from them is more than
     ``baseline_noise_ratio`` times theirs (the baseline S0 is subtracted from every later volume).
   Unusable volumes are inpainted like a gap by the pipeline (its ``usable`` mask).

Limits (measured in docs/benchmarks.md, "Motion correction"): with 5 mm slices tilts (rotation about
x and y) are only partly recovered; blur from an in-plane rotation during the volume slides the
near-circular skull along itself and is not seen by a skull anchor.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ctp_node.config import MotionSettings
from ctp_node.errors import MotionError, PerfusionError
from ctp_node.series.ctp_series import CTPSeries

MIN_VOLUMES = 5  # fewer volumes give no robust statistics (median/MAD) to call one an outlier
MIN_ANCHOR_VOXELS = 200  # bone voxels on the registration grid; a head slab has thousands
BONE_FRACTION = 0.25  # of the bone window: bone on the registration grid (950 HU with the default window)
MAD_TO_SIGMA = 1.4826
GAUSS_NEWTON_STEPS = 3
RETRY_METRIC_RATIO = 2.0
DETECTION_SMOOTHING_PX = 2.0
SOFT_TISSUE_HU = (0.0, 80.0)  # brain parenchyma and CSF on the unenhanced reference
RESIDUAL = "residual misalignment after registration"
DISCONTINUITY = "slice discontinuity (intra-volume motion)"
BASELINE = "baseline outlier"
MOTION_FILE = "motion.json"  # beside a job's result: every volume's pose, displacement, residual and reasons


@dataclass
class VolumeMotion:
    """What registration found for one volume. Rotations in degrees about x, y, z (patient axes,
    through ``MotionResult.centre_mm``), translations in mm: the pose that maps the reference onto
    this volume. ``displacement_mm``: the largest movement of a corner of the head's bounding box.
    ``residual_mm``: the anchor residual left after registration, as the in-plane shift that would
    cause it; ``slice_step_mm``: the largest disagreement between slices' in-plane positions."""

    volume: int
    time_s: float
    rotation_deg: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    displacement_mm: float
    corrected: bool
    residual_mm: float = 0.0
    slice_step_mm: float = 0.0
    reasons: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return not self.reasons


@dataclass
class MotionResult:
    """The registered series (same shape, grid and identifiers as the input), one ``VolumeMotion``
    per volume, and how long each stage took (s)."""

    series: CTPSeries
    volumes: list[VolumeMotion]
    centre_mm: tuple[float, float, float]
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def usable(self) -> np.ndarray:
        """(T,) bool: False for the volumes registration could not rescue."""
        return np.array([v.usable for v in self.volumes], dtype=bool)

    @property
    def corrected(self) -> np.ndarray:
        """(T,) bool: volumes resampled onto the reference position."""
        return np.array([v.corrected for v in self.volumes], dtype=bool)

    def comment(self) -> str:
        """One line for the derived series' ImageComments (short; the job record has the details)."""
        moved = int(self.corrected.sum())
        bad = [v for v in self.volumes if not v.usable]
        text = f"motion: {moved} of {len(self.volumes)} volumes realigned"
        if bad:
            listed = ", ".join(f"{v.time_s:g} s" for v in bad)
            text += f"; {len(bad)} unusable, synthesised ({listed})"
        return text

    def summary(self) -> dict:
        """JSON-ready record for the job: every volume's pose, displacement, residual and reasons."""
        return {
            "centre_mm": [round(c, 2) for c in self.centre_mm],
            "corrected": int(self.corrected.sum()),
            "unusable": [v.volume for v in self.volumes if not v.usable],
            "seconds": {k: round(s, 3) for k, s in self.seconds.items()},
            "notes": list(self.notes),
            "volumes": [
                {
                    "volume": v.volume, "time_s": v.time_s,
                    "rotation_deg": [round(a, 3) for a in v.rotation_deg],
                    "translation_mm": [round(t, 3) for t in v.translation_mm],
                    "displacement_mm": round(v.displacement_mm, 3), "corrected": v.corrected,
                    "residual_mm": round(v.residual_mm, 3), "slice_step_mm": round(v.slice_step_mm, 3),
                    "reasons": list(v.reasons),
                }
                for v in self.volumes
            ],
        }  # fmt: skip


@dataclass
class _Anchor:
    """The bone-window images the registration and the detection work on."""

    fixed: sitk.Image  # reference, registration grid
    mask: sitk.Image  # uint8, where the metric is evaluated
    mask_array: np.ndarray  # bool (Z, Y, X) on the registration grid
    factor: int  # in-plane binning
    pixel_mm: tuple[float, float]  # (y, x) on the registration grid


def correct_motion(series: CTPSeries, settings: MotionSettings | None = None) -> MotionResult:
    """Register every volume of ``series`` to its baseline and flag the volumes registration cannot rescue.

    Raises ``MotionError`` for a series that cannot be checked (fewer than 5 volumes, NaN or infinite
    voxels, no skull in the slab); the message says what to do.
    """
    cfg = settings or MotionSettings()
    _check_input(series, cfg)
    seconds: dict[str, float] = {}
    previous_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(cfg.threads)
    try:
        mark = time.perf_counter()
        hu = series.hu
        reference = np.median(hu[: min(cfg.reference_volumes, hu.shape[0])], axis=0).astype(np.float32)
        anchor = _anchor(series, reference, cfg)
        centre = _mask_centre(anchor)
        seconds["prepare"] = time.perf_counter() - mark

        mark = time.perf_counter()
        transforms = _register_all(series, anchor, centre, cfg)
        seconds["register"] = time.perf_counter() - mark

        mark = time.perf_counter()
        skull = _skull_points(anchor)
        full_reference = _image(reference, series, 1)
        # The series is copied only when a volume is resampled: a still series (the common case) is
        # passed on as it is, without a second full-size array.
        registered = hu
        volumes = []
        for t, tx in enumerate(transforms):
            shift = _displacement(tx, skull)
            corrected = shift > cfg.min_correction_mm
            if corrected:
                if registered is hu:
                    registered = hu.astype(np.float32, copy=True)
                registered[t] = _resample(hu[t], series, full_reference, tx, cfg.interpolation)
            volumes.append(_volume_motion(t, float(series.times_s[t]), tx, shift, corrected))
        seconds["resample"] = time.perf_counter() - mark

        mark = time.perf_counter()
        notes: list[str] = []
        _detect_misalignment(series, registered, reference, anchor, transforms, volumes, cfg, notes)
        _detect_baseline_outliers(registered, series.times_s, reference, volumes, cfg, notes)
        seconds["detect"] = time.perf_counter() - mark
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous_threads)
    seconds["total"] = sum(seconds.values())
    out = series if registered is hu else dataclasses.replace(series, hu=registered)
    return MotionResult(out, volumes, tuple(float(c) for c in centre), seconds, notes)


# --- input ----------------------------------------------------------------------------------------


def _check_input(series: CTPSeries, cfg: MotionSettings) -> None:
    n = series.hu.shape[0]
    if n < MIN_VOLUMES:
        raise MotionError(
            f"{n} volume(s): motion detection needs at least {MIN_VOLUMES} to tell a moved volume from the "
            "others; process the series without it ([motion] enabled = false)"
        )
    if not np.isfinite(series.hu.sum(dtype=np.float64)):
        bad = sorted({int(t) for t in np.argwhere(~np.isfinite(series.hu))[:, 0]})
        raise MotionError(
            f"volumes {bad[:10]} contain NaN or infinite voxels: the series is not valid HU; check the source "
            "(RescaleSlope/Intercept, decoding) before processing"
        )
    if cfg.reference_volumes > n:
        raise MotionError(f"[motion] reference_volumes = {cfg.reference_volumes} but the series has {n} volumes")


# --- anchor images --------------------------------------------------------------------------------


def _bone_window(volume: np.ndarray, cfg: MotionSettings) -> np.ndarray:
    low, high = cfg.bone_hu
    return np.clip(volume, low, high).astype(np.float32) - np.float32(low)


def _bin(volume: np.ndarray, factor: int) -> np.ndarray:
    """In-plane block mean by ``factor`` (Z, Y, X), cropping the last partial blocks."""
    if factor == 1:
        return np.ascontiguousarray(volume, dtype=np.float32)
    z, y, x = volume.shape
    y, x = y // factor * factor, x // factor * factor
    blocks = volume[:, :y, :x].reshape(z, y // factor, factor, x // factor, factor)
    return blocks.mean(axis=(2, 4), dtype=np.float32)


def _image(array: np.ndarray, series: CTPSeries, factor: int) -> sitk.Image:
    """``array`` (Z, Y, X) on the series' grid binned in-plane by ``factor``, as a SimpleITK image."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    dz, dy, dx = series.spacing_mm
    direction = np.asarray(series.direction, dtype=np.float64)
    # A block's centre lies (factor - 1) / 2 voxels into it along rows and columns.
    offset = direction @ np.array([(factor - 1) / 2 * dx, (factor - 1) / 2 * dy, 0.0])
    image.SetSpacing((dx * factor, dy * factor, dz))
    image.SetOrigin(tuple(float(v) for v in np.asarray(series.origin) + offset))
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    return image


def _anchor(series: CTPSeries, reference: np.ndarray, cfg: MotionSettings) -> _Anchor:
    _, dy, dx = series.spacing_mm
    factor = max(1, int(round(cfg.registration_pixel_mm / max(dx, dy))))
    fixed = _bin(_bone_window(reference, cfg), factor)
    # The skull on the registration grid, widened by one pixel so that an edge that moved outwards
    # is still inside the region the metric sees.
    low, high = cfg.bone_hu
    bone = fixed > BONE_FRACTION * (high - low)
    mask = ndimage.binary_dilation(bone, structure=np.ones((1, 3, 3), bool))
    if int(bone.sum()) < MIN_ANCHOR_VOXELS:
        threshold = low + BONE_FRACTION * (high - low)
        raise MotionError(
            f"no skull in the slab ({int(bone.sum())} voxels above {threshold:g} HU on the registration grid): "
            "motion correction anchors on bone; check that this is a head CT in HU, or set [motion] enabled = false"
        )
    mask_image = _image(mask.astype(np.uint8), series, factor)
    return _Anchor(_image(fixed, series, factor), mask_image, mask, factor, (dy * factor, dx * factor))


def _mask_centre(anchor: _Anchor) -> np.ndarray:
    """Patient position (mm) of the skull mask's centroid: rotations about it barely translate the head."""
    z, y, x = np.argwhere(anchor.mask_array).mean(axis=0)
    return np.asarray(anchor.fixed.TransformContinuousIndexToPhysicalPoint((float(x), float(y), float(z))))


def _skull_points(anchor: _Anchor) -> np.ndarray:
    """(N, 3) patient positions of the anchor's skull voxels (at most a few thousand)."""
    index = np.argwhere(anchor.mask_array)[:, ::-1].astype(np.float64)  # (x, y, z) indices
    index = index[:: max(1, index.shape[0] // 2000)]
    return np.array([anchor.fixed.TransformContinuousIndexToPhysicalPoint(tuple(i)) for i in index])


# --- registration ---------------------------------------------------------------------------------


def _register_all(
    series: CTPSeries, anchor: _Anchor, centre: np.ndarray, cfg: MotionSettings
) -> list[sitk.Euler3DTransform]:
    """Each volume from the reference pose; one that ends far worse than the others so far is tried
    again from its predecessor's pose (a head that moved and stayed), and the better fit kept.
    Volumes whose anchor already matches the reference within the noise are not registered."""
    images = [_bin(_bone_window(volume, cfg), anchor.factor) for volume in series.hu]
    still = _still(images, anchor, 0.5 * cfg.min_correction_mm)
    transforms: list[sitk.Euler3DTransform] = []
    metrics: list[float] = []
    identity = sitk.Euler3DTransform()
    identity.SetCenter(tuple(float(c) for c in centre))
    for t, image in enumerate(images):
        if still[t]:
            transforms.append(sitk.Euler3DTransform(identity))
            continue
        moving = _image(image, series, anchor.factor)
        tx, metric = _register(anchor, moving, identity)
        if transforms and len(metrics) >= 3 and metric > RETRY_METRIC_RATIO * np.median(metrics):
            again, again_metric = _register(anchor, moving, transforms[-1])
            if again_metric < metric:
                tx, metric = again, again_metric
        transforms.append(tx)
        metrics.append(metric)
    return transforms


def _still(images: list[np.ndarray], anchor: _Anchor, tolerance_mm: float) -> np.ndarray:
    """(T,) bool: volumes whose anchor differs from the reference's by less than a shift of
    ``tolerance_mm`` would make, above the noise (the lower quartile of the series' differences)."""
    fixed = _smooth(sitk.GetArrayFromImage(anchor.fixed))
    residual = _mean_squares(np.stack([_smooth(i) for i in images]), fixed, anchor.mask_array).mean(axis=1)
    _, calibration = _calibration(fixed, anchor.mask_array, anchor.pixel_mm, tolerance_mm)
    return residual - np.percentile(residual, 25) < calibration


def _register(anchor: _Anchor, moving: sitk.Image, start: sitk.Euler3DTransform) -> tuple[sitk.Euler3DTransform, float]:
    """The pose of ``moving`` against the reference, from ``start``, and the final metric value."""
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMeanSquares()
    method.SetMetricFixedMask(anchor.mask)
    method.SetInterpolator(sitk.sitkLinear)
    # Every voxel of the mask: random subsets of a third biased in-plane rotations by 0.3 deg on the phantom.
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-3, numberOfIterations=100, relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6
    )
    method.SetOptimizerScalesFromPhysicalShift()
    # Two levels in-plane; slices stay (5 mm slices leave few to halve).
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1.0, 0.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    initial = sitk.Euler3DTransform(start)
    method.SetInitialTransform(initial, inPlace=True)
    method.Execute(anchor.fixed, moving)
    return initial, float(method.GetMetricValue())


def _displacement(tx: sitk.Euler3DTransform, points: np.ndarray) -> float:
    """The largest distance (mm) the transform moves any of ``points`` (N, 3)."""
    matrix = np.asarray(tx.GetMatrix()).reshape(3, 3)
    centre, translation = np.asarray(tx.GetCenter()), np.asarray(tx.GetTranslation())
    moved = (points - centre) @ matrix.T + centre + translation
    return float(np.linalg.norm(moved - points, axis=1).max())


INTERPOLATORS = {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline}


def _resample(
    volume: np.ndarray, series: CTPSeries, reference: sitk.Image, tx: sitk.Transform, interpolation: str
) -> np.ndarray:
    moving = _image(np.ascontiguousarray(volume, dtype=np.float32), series, 1)
    out = sitk.Resample(moving, reference, tx, INTERPOLATORS[interpolation], -1024.0, sitk.sitkFloat32, True)
    return sitk.GetArrayFromImage(out)


def _volume_motion(t: int, time_s: float, tx: sitk.Euler3DTransform, shift: float, corrected: bool) -> VolumeMotion:
    rx, ry, rz, *translation = tx.GetParameters()
    # The transform maps reference points to this volume's: it is the volume's pose.
    return VolumeMotion(
        volume=t,
        time_s=time_s,
        rotation_deg=tuple(float(np.degrees(a)) for a in (rx, ry, rz)),
        translation_mm=tuple(float(v) for v in translation),
        displacement_mm=shift,
        corrected=corrected,
    )


# --- detection ------------------------------------------------------------------------------------


def robust_z(values: np.ndarray, axis: int = 0, floor: float = 1e-6) -> np.ndarray:
    """(x - median) / (1.4826 MAD) along ``axis``; the scale is at least ``floor`` (no division by 0)."""
    median = np.median(values, axis=axis, keepdims=True)
    mad = np.median(np.abs(values - median), axis=axis, keepdims=True) * MAD_TO_SIGMA
    return (values - median) / np.maximum(mad, floor)


def _detect_misalignment(
    series: CTPSeries,
    registered: np.ndarray,
    reference: np.ndarray,
    anchor: _Anchor,
    transforms: list[sitk.Euler3DTransform],
    volumes: list[VolumeMotion],
    cfg: MotionSettings,
    notes: list[str],
) -> None:
    # Compared after an in-plane Gaussian of two registration pixels (about 4 mm): noise and the
    # pixel-scale ripple of interpolation vanish, while a structure moved (or smeared) by a millimetre
    # still changes the smoothed image coherently along its whole edge.
    fixed = _smooth(sitk.GetArrayFromImage(anchor.fixed))
    mask = anchor.mask_array
    moved = np.stack([_smooth(_bin(_bone_window(v, cfg), anchor.factor)) for v in registered])
    per_slice = _mean_squares(moved, fixed, mask)  # (T, Z)
    # Linear interpolation of sharp edges leaves a residual of its own in every resampled volume;
    # measured on the reference taken there and back by the same transform (two interpolations: half).
    floor = np.zeros_like(per_slice)
    full_reference = _image(reference, series, 1)
    for t, v in enumerate(volumes):
        if v.corrected:
            there = _resample(reference, series, full_reference, transforms[t].GetInverse(), cfg.interpolation)
            back = _resample(there, series, full_reference, transforms[t], cfg.interpolation)
            floor[t] = _mean_squares(_smooth(_bin(_bone_window(back, cfg), anchor.factor))[None], fixed, mask)[0] / 2
    counts = mask.sum(axis=(1, 2))
    used = counts >= 10  # slices with enough skull to judge
    weights = counts / max(counts.sum(), 1)
    per_volume, floor_volume = per_slice @ weights, floor @ weights
    cal_slice, cal_volume = _calibration(fixed, mask, anchor.pixel_mm, cfg.max_misalignment_mm)

    # Excess over the series' typical residual (noise) and the volume's interpolation floor, in mm of
    # equivalent in-plane shift (the residual grows with the square of a small shift's size).
    excess_volume = _equivalent_mm(per_volume - floor_volume, cal_volume, cfg.max_misalignment_mm)
    excess_slice = _equivalent_mm(per_slice - floor, cal_slice, cfg.max_misalignment_mm)
    z_volume = robust_z(per_volume - floor_volume, floor=1e-3 * cal_volume)
    z_slice = robust_z(per_slice - floor, floor=1e-3 * cal_slice.min())
    bad_slice = (excess_slice > cfg.max_misalignment_mm) & (z_slice > cfg.outlier_z) & used[None]
    bad_volume = (excess_volume > cfg.max_misalignment_mm) & (z_volume > cfg.outlier_z)

    shifts = _slice_shifts(moved, fixed, mask, anchor.pixel_mm)  # (T, Z, 2) mm
    steps = _slice_steps(shifts, used)
    z_step = robust_z(steps, floor=0.05 * cfg.max_misalignment_mm)
    bad_step = (steps > cfg.max_misalignment_mm) & (z_step > cfg.outlier_z)

    misaligned = excess_volume > cfg.max_misalignment_mm
    if misaligned.sum() > len(volumes) // 2:
        notes.append(
            f"{int(misaligned.sum())} of {len(volumes)} volumes stay misaligned by more than "
            f"{cfg.max_misalignment_mm:g} mm after registration: too many to call outliers; check the series"
        )
    for t, v in enumerate(volumes):
        v.residual_mm = float(excess_volume[t])
        v.slice_step_mm = float(steps[t])
        slices = np.flatnonzero(bad_slice[t])
        # A step between slices, or residual in some slices only, is motion within the volume; residual
        # everywhere (blur, a failed registration) is misalignment of the whole volume.
        if bad_step[t] or (slices.size and not (bad_volume[t] and slices.size * 2 >= int(used.sum()))):
            where = f"slices {_ranges(slices)}" if slices.size else "slices"
            v.reasons.append(f"{DISCONTINUITY}: {where} off by up to {max(steps[t], excess_volume[t]):.1f} mm")
        elif bad_volume[t] or slices.size:
            v.reasons.append(f"{RESIDUAL} (about {excess_volume[t]:.1f} mm)")


def _mean_squares(moved: np.ndarray, fixed: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(T, Z) mean squared difference inside the mask, per volume and slice."""
    diff2 = (moved - fixed[None]) ** 2 * mask[None]
    return diff2.sum(axis=(2, 3)) / np.maximum(mask.sum(axis=(1, 2)), 1)


def _equivalent_mm(residual: np.ndarray, calibration: np.ndarray | float, shift_mm: float) -> np.ndarray:
    """Excess of ``residual`` (mean squares) over its median across volumes, as an in-plane shift in mm."""
    excess = residual - np.median(residual, axis=0)
    return np.sqrt(np.maximum(excess, 0) / calibration) * shift_mm


def _smooth(volume: np.ndarray) -> np.ndarray:
    return ndimage.gaussian_filter(volume, sigma=(0.0, DETECTION_SMOOTHING_PX, DETECTION_SMOOTHING_PX))


def _calibration(
    fixed: np.ndarray, mask: np.ndarray, pixel_mm: tuple[float, float], shift_mm: float
) -> tuple[np.ndarray, float]:
    """Mean squared anchor residual (per slice, whole volume) that a rigid in-plane shift of ``shift_mm``
    along rows and along columns (averaged) produces on the reference itself."""
    per_slice = np.zeros(fixed.shape[0])
    total = 0.0
    for axis, pixel in ((1, pixel_mm[0]), (2, pixel_mm[1])):
        offset = [0.0, 0.0, 0.0]
        offset[axis] = shift_mm / pixel
        diff2 = (ndimage.shift(fixed, offset, order=1, mode="nearest") - fixed) ** 2 * mask
        per_slice += diff2.sum(axis=(1, 2)) / np.maximum(mask.sum(axis=(1, 2)), 1) / 2
        total += diff2.sum() / max(mask.sum(), 1) / 2
    tiny = 1e-6 * max(total, 1e-12)
    return np.maximum(per_slice, tiny), max(total, 1e-12)


def _slice_shifts(moved: np.ndarray, fixed: np.ndarray, mask: np.ndarray, pixel_mm: tuple[float, float]) -> np.ndarray:
    """(T, Z, 2) in-plane (row, column) shift in mm of each registered slice against the reference's,
    by Gauss-Newton on the anchor images (linearised optical flow, a few steps)."""
    gy, gx = np.gradient(fixed, axis=(1, 2))
    t_count, z_count = moved.shape[:2]
    out = np.zeros((t_count, z_count, 2))
    for z in range(z_count):
        m = mask[z]
        if m.sum() < 10:
            continue
        a = np.stack([gy[z][m], gx[z][m]], axis=1).astype(np.float64)
        normal = a.T @ a
        if np.linalg.cond(normal) > 1e8:
            continue
        solve = np.linalg.solve(normal, a.T)  # (2, n)
        for t in range(t_count):
            d = np.zeros(2)  # pixels: the slice's content sits at the reference's position + d
            for _ in range(GAUSS_NEWTON_STEPS):
                back = ndimage.shift(moved[t, z], -d, order=1, mode="nearest")
                d = d - solve @ (back[m] - fixed[z][m])
            out[t, z] = d * np.asarray(pixel_mm)
    return out


def _slice_steps(shifts: np.ndarray, used: np.ndarray) -> np.ndarray:
    """Per volume, the largest distance (mm) between the in-plane positions of two judged slices."""
    kept = shifts[:, used]  # (T, Zu, 2)
    if kept.shape[1] < 2:
        return np.zeros(shifts.shape[0])
    spread = np.linalg.norm(kept[:, :, None, :] - kept[:, None, :, :], axis=-1)
    return spread.max(axis=(1, 2))


def _detect_baseline_outliers(
    registered: np.ndarray,
    times_s: np.ndarray,
    reference: np.ndarray,
    volumes: list[VolumeMotion],
    cfg: MotionSettings,
    notes: list[str],
) -> None:
    from ctp_node.perfusion.timing import detect_bolus_arrival

    soft = (reference > SOFT_TISSUE_HU[0]) & (reference < SOFT_TISSUE_HU[1])
    soft = ndimage.binary_erosion(soft, structure=np.ones((1, 3, 3), bool))  # away from bone and air edges
    if soft.sum() < 100:
        notes.append("too little soft tissue to check the baseline volumes")
        return
    # Volumes already unusable would pass their edges off as the strongest enhancement.
    usable = np.flatnonzero([v.usable for v in volumes])
    try:
        baseline = usable[detect_bolus_arrival(registered[usable], times_s[usable], soft).baseline_frames]
    except PerfusionError as exc:
        notes.append(f"baseline not found, baseline volumes not checked: {exc}")
        return
    if baseline.size < 3:
        notes.append(f"{baseline.size} usable baseline volume(s): too few to find an outlier among them")
        return
    values = registered[baseline][:, soft].astype(np.float64)  # (B, V)
    typical = np.median(values, axis=0)
    offset = (values - typical).mean(axis=1)
    rms = np.sqrt(((values - typical) ** 2).mean(axis=1))
    z_offset = robust_z(offset, floor=0.1 * cfg.baseline_offset_hu)
    z_rms = robust_z(rms, floor=0.05 * float(np.median(rms)) + 1e-6)
    for i, t in enumerate(baseline):
        off = abs(offset[i] - np.median(offset))
        if off > cfg.baseline_offset_hu and abs(z_offset[i]) > cfg.outlier_z:
            volumes[t].reasons.append(f"{BASELINE}: mean brain HU {offset[i]:+.1f} off the other baseline volumes")
        elif rms[i] > cfg.baseline_noise_ratio * np.median(rms) and z_rms[i] > cfg.outlier_z:
            volumes[t].reasons.append(
                f"{BASELINE}: differs from the other baseline volumes by {rms[i]:.1f} HU RMS "
                f"({rms[i] / np.median(rms):.1f} times their typical)"
            )


def _ranges(indices: np.ndarray) -> str:
    """'0-3, 6' for [0, 1, 2, 3, 6]."""
    parts, start = [], None
    for i, k in enumerate(indices):
        if start is None:
            start = k
        if i + 1 == len(indices) or indices[i + 1] != k + 1:
            parts.append(f"{start}" if start == k else f"{start}-{k}")
            start = None
    return ", ".join(parts)
