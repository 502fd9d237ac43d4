"""Evaluation metrics shared by every comparison of a candidate series with the truth.

Image agreement (synthetic volumes against the true ones), in the model's window:
- Both volumes are clipped to 0..80 HU first (what the model sees and produces); data range L = 80.
- PSNR = 10 log10(L^2 / MSE), MSE over the mask voxels; ``inf`` when they are identical there.
- SSIM (Wang et al. 2004) in 3D with a Gaussian window (sigma 1.5 voxels per axis, truncated at
  3.5 sigma), C1 = (0.01 L)^2, C2 = (0.03 L)^2. The local means, variances and covariance are
  *mask-normalised*: ``mu = G * (m x) / G * m`` and so on, so voxels outside the mask (background,
  skull, other slabs) never enter a window; the SSIM map is averaged over the mask voxels.

Perfusion-map agreement (candidate maps against reference maps, e.g. the phantom's truth or the
maps of the acquired 1 s series): per map and region the median absolute error, the median
relative error |c - r| / |r| (voxels with r = 0 skipped) and the median signed error (bias); Dice
and volumes of the core and hypoperfusion masks.

Issue 10's measures (raw HU, no window): ``difference_stats`` (mean offset, mean absolute difference
over selected frames and a region), ``curve_rmse`` of mean tissue curves and ``peak_error`` of a
curve's maximum (map disagreement: ``ctp_node.perfusion.compare.median_disagreement``).
Every result is a plain dataclass; ``to_dict()`` gives JSON-ready values (non-finite -> None).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
from scipy import ndimage

WINDOW_HU = (0.0, 80.0)
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
PERFUSION_MAPS = ("cbf", "cbv", "mtt", "tmax")


def _json_ready(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


class _ToDict:
    def to_dict(self) -> dict:
        return _json_ready(asdict(self))  # type: ignore[call-overload]


def _window(volume: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    return np.clip(np.asarray(volume, dtype=np.float64), window[0], window[1])


def _mask_for(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if mask is None:
        return np.ones(shape, dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != shape:
        raise ValueError(f"mask has shape {mask.shape}, the volumes {shape}")
    if not mask.any():
        raise ValueError("the mask is empty: metrics need at least one voxel")
    return mask


def _check_pair(candidate: np.ndarray, reference: np.ndarray) -> None:
    if np.shape(candidate) != np.shape(reference):
        raise ValueError(f"candidate {np.shape(candidate)} and reference {np.shape(reference)} differ in shape")


def _masked_diff(
    candidate: np.ndarray, reference: np.ndarray, m: np.ndarray, window: tuple[float, float]
) -> np.ndarray:
    """Windowed candidate minus windowed reference, at the mask's voxels."""
    return _window(candidate, window)[m] - _window(reference, window)[m]


def _psnr(mse: float, window: tuple[float, float]) -> float:
    data_range = window[1] - window[0]
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range**2 / mse)


def masked_psnr(
    candidate: np.ndarray,
    reference: np.ndarray,
    mask: np.ndarray | None = None,
    window: tuple[float, float] = WINDOW_HU,
) -> float:
    """PSNR (dB) inside ``mask`` after clipping both to ``window``; inf when identical there."""
    _check_pair(candidate, reference)
    diff = _masked_diff(candidate, reference, _mask_for(mask, np.shape(reference)), window)
    return _psnr(float(np.mean(diff**2)), window)


def masked_ssim(
    candidate: np.ndarray,
    reference: np.ndarray,
    mask: np.ndarray | None = None,
    window: tuple[float, float] = WINDOW_HU,
    sigma: float | Sequence[float] = SSIM_SIGMA,
    truncate: float = SSIM_TRUNCATE,
) -> float:
    """Mean 3D SSIM over ``mask`` with mask-normalised Gaussian statistics (see the module docstring)."""
    _check_pair(candidate, reference)
    m = _mask_for(mask, np.shape(reference))
    x, y = _window(candidate, window), _window(reference, window)
    w = m.astype(np.float64)

    def local(v: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(v, sigma, truncate=truncate, mode="constant")

    weight = np.maximum(local(w), 1e-12)
    mu_x, mu_y = local(w * x) / weight, local(w * y) / weight
    var_x = np.maximum(local(w * x * x) / weight - mu_x**2, 0.0)
    var_y = np.maximum(local(w * y * y) / weight - mu_y**2, 0.0)
    cov = local(w * x * y) / weight - mu_x * mu_y
    data_range = window[1] - window[0]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(np.mean(ssim_map[m]))


@dataclass
class ImageMetrics(_ToDict):
    """Agreement of one volume (or the pooled voxels of several) in the 0..80 HU window."""

    psnr_db: float  # inf (None in to_dict): identical inside the mask
    ssim: float
    mae_hu: float
    n_voxels: int


def image_metrics(
    candidate: np.ndarray,
    reference: np.ndarray,
    mask: np.ndarray | None = None,
    window: tuple[float, float] = WINDOW_HU,
) -> ImageMetrics:
    """PSNR, SSIM and mean absolute error of one (Z, Y, X) volume."""
    _check_pair(candidate, reference)
    m = _mask_for(mask, np.shape(reference))
    diff = _masked_diff(candidate, reference, m, window)
    return ImageMetrics(
        psnr_db=_psnr(float(np.mean(diff**2)), window),
        ssim=masked_ssim(candidate, reference, m, window),
        mae_hu=float(np.mean(np.abs(diff))),
        n_voxels=int(m.sum()),
    )


@dataclass
class SequenceImageMetrics(_ToDict):
    """Per-frame metrics of the evaluated frames and their summary.

    ``psnr_db`` is computed from the MSE pooled over all evaluated frames (well defined even when
    one frame is identical); ``ssim`` and ``mae_hu`` are means over the frames.
    """

    frames: list[int]
    per_frame: list[ImageMetrics]
    psnr_db: float
    ssim: float
    mae_hu: float


def sequence_image_metrics(
    candidate: np.ndarray,
    reference: np.ndarray,
    mask: np.ndarray | None = None,
    frames: np.ndarray | None = None,
    window: tuple[float, float] = WINDOW_HU,
) -> SequenceImageMetrics:
    """Metrics of (T, Z, Y, X) sequences over the frames flagged in ``frames`` (T,) bool, e.g. the
    synthetic seconds; all frames when None."""
    _check_pair(candidate, reference)
    selected = np.ones(reference.shape[0], bool) if frames is None else np.asarray(frames, dtype=bool)
    if selected.shape != (reference.shape[0],) or not selected.any():
        raise ValueError(f"frames must be a non-empty (T,) bool selection with T = {reference.shape[0]}")
    m = _mask_for(mask, reference.shape[1:])
    idx = [int(i) for i in np.flatnonzero(selected)]
    per_frame = [image_metrics(candidate[i], reference[i], m, window) for i in idx]
    pooled = np.stack([_masked_diff(candidate[i], reference[i], m, window) for i in idx])
    return SequenceImageMetrics(
        frames=idx,
        per_frame=per_frame,
        psnr_db=_psnr(float(np.mean(pooled**2)), window),
        ssim=float(np.mean([f.ssim for f in per_frame])),
        mae_hu=float(np.mean([f.mae_hu for f in per_frame])),
    )


class MapsLike(Protocol):
    """What the agreement needs: ``PerfusionMaps`` and ``ReferenceMaps`` both qualify."""

    cbf: np.ndarray
    cbv: np.ndarray
    mtt: np.ndarray
    tmax: np.ndarray
    core_mask: np.ndarray
    hypoperfusion_mask: np.ndarray


@dataclass
class ReferenceMaps:
    """Reference maps from anywhere (e.g. a phantom's truth), same units as ``PerfusionMaps``."""

    cbf: np.ndarray
    cbv: np.ndarray
    mtt: np.ndarray
    tmax: np.ndarray
    core_mask: np.ndarray
    hypoperfusion_mask: np.ndarray

    @classmethod
    def by_convention(
        cls, cbf: np.ndarray, cbv: np.ndarray, mtt: np.ndarray, tmax: np.ndarray, tissue: np.ndarray
    ) -> ReferenceMaps:
        """True maps with the masks a perfect analysis would report: the clinical conventions
        (core rCBF < 30 % within Tmax > 6 s, hypoperfusion Tmax > 6 s; ``perfusion.lesion``) applied
        to them. A phantom's lesion labels can differ: the referenced phantom's white-matter
        penumbra has 30 % of normal white-matter flow, so the conventions call it core."""
        from ctp_node.perfusion.lesion import lesion_masks

        masks = lesion_masks(tissue, cbf, tmax)
        return cls(cbf=cbf, cbv=cbv, mtt=mtt, tmax=tmax, core_mask=masks.core, hypoperfusion_mask=masks.hypoperfusion)


@dataclass
class MapError(_ToDict):
    median_abs_error: float
    median_rel_error: float  # fraction (0.1 = 10 %)
    median_error: float  # signed, candidate - reference
    n_voxels: int


@dataclass
class MaskAgreement(_ToDict):
    dice: float  # 1.0 when both masks are empty
    candidate_voxels: int
    reference_voxels: int
    candidate_volume_ml: float | None = None
    reference_volume_ml: float | None = None
    volume_error_ml: float | None = None  # candidate - reference
    abs_volume_error_ml: float | None = None


@dataclass
class PerfusionAgreement(_ToDict):
    maps: dict[str, dict[str, MapError]] = field(default_factory=dict)  # map -> region -> error
    core: MaskAgreement | None = None
    hypoperfusion: MaskAgreement | None = None


def map_error(candidate: np.ndarray, reference: np.ndarray, region: np.ndarray) -> MapError:
    """Median absolute, relative and signed error of ``candidate`` against ``reference`` in ``region``."""
    _check_pair(candidate, reference)
    region = np.asarray(region, dtype=bool)
    c = np.asarray(candidate, dtype=np.float64)[region]
    r = np.asarray(reference, dtype=np.float64)[region]
    if c.size == 0:
        return MapError(math.nan, math.nan, math.nan, 0)
    nonzero = r != 0
    rel = np.abs(c[nonzero] - r[nonzero]) / np.abs(r[nonzero])
    return MapError(
        median_abs_error=float(np.median(np.abs(c - r))),
        median_rel_error=float(np.median(rel)) if rel.size else math.nan,
        median_error=float(np.median(c - r)),
        n_voxels=int(c.size),
    )


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """2 |A & B| / (|A| + |B|); 1.0 when both are empty (perfect agreement on "no lesion")."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    _check_pair(a, b)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def mask_agreement(candidate: np.ndarray, reference: np.ndarray, voxel_volume_ml: float | None = None) -> MaskAgreement:
    n_c, n_r = int(np.sum(candidate)), int(np.sum(reference))
    out = MaskAgreement(dice=dice(candidate, reference), candidate_voxels=n_c, reference_voxels=n_r)
    if voxel_volume_ml is not None:
        out.candidate_volume_ml = n_c * voxel_volume_ml
        out.reference_volume_ml = n_r * voxel_volume_ml
        out.volume_error_ml = (n_c - n_r) * voxel_volume_ml
        out.abs_volume_error_ml = abs(n_c - n_r) * voxel_volume_ml
    return out


def perfusion_agreement(
    candidate: MapsLike,
    reference: MapsLike,
    regions: Mapping[str, np.ndarray],
    voxel_volume_ml: float | None = None,
    maps: Sequence[str] = PERFUSION_MAPS,
) -> PerfusionAgreement:
    """Agreement of candidate maps with reference maps per region (e.g. {"grey": gm, "white": wm})."""
    result = PerfusionAgreement()
    for name in maps:
        c, r = getattr(candidate, name), getattr(reference, name)
        result.maps[name] = {region: map_error(c, r, mask) for region, mask in regions.items()}
    result.core = mask_agreement(candidate.core_mask, reference.core_mask, voxel_volume_ml)
    result.hypoperfusion = mask_agreement(candidate.hypoperfusion_mask, reference.hypoperfusion_mask, voxel_volume_ml)
    return result


# --- Tissue offsets, curves, map disagreement and peaks (issue 10's targets) ---------------------
#
# These compare raw HU (no window): an offset of the synthetic seconds is what a reader's perfusion
# software sees, whether or not it lies in the model's window.


@dataclass
class DifferenceStats(_ToDict):
    """Candidate minus reference over selected frames and a region, in HU (not windowed)."""

    mean_hu: float  # signed: the offset
    mean_abs_hu: float
    worst_frame_mean_hu: float  # the frame whose mean difference is farthest from 0 (signed)
    n_voxels: int  # region voxels per frame


def _selected(frames: np.ndarray | None, n_t: int) -> np.ndarray:
    selected = np.ones(n_t, bool) if frames is None else np.asarray(frames, dtype=bool)
    if selected.shape != (n_t,) or not selected.any():
        raise ValueError(f"frames must be a non-empty (T,) bool selection with T = {n_t}")
    return selected


def difference_stats(
    candidate: np.ndarray, reference: np.ndarray, region: np.ndarray, frames: np.ndarray | None = None
) -> DifferenceStats:
    """Mean, mean absolute and worst per-frame mean of ``candidate - reference`` (T, Z, Y, X) over the
    frames flagged in ``frames`` and the voxels of ``region`` (Z, Y, X); NaN when the region is empty."""
    _check_pair(candidate, reference)
    selected = _selected(frames, reference.shape[0])
    region = np.asarray(region, dtype=bool)
    if region.shape != reference.shape[1:]:
        raise ValueError(f"region has shape {region.shape}, the volumes {reference.shape[1:]}")
    n = int(region.sum())
    if n == 0:
        return DifferenceStats(math.nan, math.nan, math.nan, 0)
    idx = np.flatnonzero(selected)
    diff = np.stack([candidate[i][region].astype(np.float64) - reference[i][region] for i in idx])
    per_frame = diff.mean(axis=1)
    return DifferenceStats(
        mean_hu=float(diff.mean()),
        mean_abs_hu=float(np.abs(diff).mean()),
        worst_frame_mean_hu=float(per_frame[np.argmax(np.abs(per_frame))]),
        n_voxels=n,
    )


def mean_curve(hu: np.ndarray, region: np.ndarray) -> np.ndarray:
    """(T,) mean HU of ``region`` (Z, Y, X) in every frame of ``hu`` (T, Z, Y, X); NaN if empty."""
    region = np.asarray(region, dtype=bool)
    if not region.any():
        return np.full(hu.shape[0], math.nan)
    return np.array([float(np.mean(frame[region], dtype=np.float64)) for frame in hu])


def curve_rmse(
    candidate: np.ndarray, reference: np.ndarray, region: np.ndarray, frames: np.ndarray | None = None
) -> float:
    """RMSE (HU) between the mean curves of ``region`` over the selected frames: how well the
    candidate follows the tissue's bolus shape, not its voxel noise."""
    _check_pair(candidate, reference)
    selected = _selected(frames, reference.shape[0])
    c, r = mean_curve(candidate, region), mean_curve(reference, region)
    return float(np.sqrt(np.mean((c[selected] - r[selected]) ** 2)))


@dataclass
class PeakError(_ToDict):
    """Peak of a candidate curve against the reference's: height (HU) and time (s), signed."""

    height_hu: float  # candidate peak - reference peak
    time_s: float  # candidate peak time - reference peak time
    reference_height_hu: float
    reference_time_s: float


def peak_error(candidate: np.ndarray, reference: np.ndarray, times_s: np.ndarray) -> PeakError:
    """Height and time of the maximum of two (T,) curves sampled at ``times_s``."""
    c, r, t = (np.asarray(v, dtype=np.float64) for v in (candidate, reference, times_s))
    if not (c.shape == r.shape == t.shape) or c.ndim != 1 or c.size == 0:
        raise ValueError(f"curves and times must be equal-length 1-D arrays, got {c.shape}, {r.shape}, {t.shape}")
    ic, ir = int(np.argmax(c)), int(np.argmax(r))
    return PeakError(float(c[ic] - r[ir]), float(t[ic] - t[ir]), float(r[ir]), float(t[ir]))
