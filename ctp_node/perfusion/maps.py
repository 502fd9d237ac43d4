"""`compute_perfusion`: a 4D HU series and its acquisition times to CBF, CBV, MTT, Tmax and TTP maps.

Steps: frames that are linear interpolations of their neighbours dropped (``timing.interpolated_frames``)
-> bolus arrival and baseline S0 (mean of the pre-arrival frames) -> brain mask on S0 ->
concentration curves S - S0 -> linear resampling to a uniform grid -> automatic AIF and VOF (from
the unfiltered series; ``aif``: arterial checks with reasons, the AIF area scaled up to the venous one
as partial-volume correction) -> noise handling of the parenchyma curves (``denoise``: model subspace + TIPS
filter, the default) -> a model-based fit (``parametric``, the default: delay, transit time and
residue shape per voxel, baseline re-estimated from the frames before each voxel's bolus) or
block-circulant deconvolution (bSVD or oSVD) -> maps (low-flow tissue's Tmax from a wider neighbourhood,
``low_flow``) -> core and hypoperfusion (see ``lesion``) ->
which of their volumes the study can support (``reliability``: the others are withheld, with the reason).

Default analysis on held-out noisy phantoms: benchmarks/perfusion_accuracy.py, docs/benchmarks.md.

Units: CBF mL/100 g/min, CBV mL/100 g, MTT s, Tmax s (time of the maximum of the residue, i.e. the
delay of the tissue relative to the AIF), TTP s from the first acquisition. Outside the brain mask
every map is 0.

CBF = k * max(F R) * 6000. CBV is the area ratio ``k * 100 * integral(C) / integral(AIF)`` rather
than ``k * sum(R) * dt * 100``: for the block-circulant solution the two are the same number (the
zero-frequency singular value is the largest and is never truncated), but the area ratio does not
depend on the truncation threshold, on oSVD's per-voxel choice or on the delay, and needs no
deconvolution at all. MTT = CBV / CBF * 60 (central volume theorem). With the default analysis CBF
is CBV / fitted MTT * 60 instead: at low signal the fitted amplitude is biased high, the area is not;
MTT is the fitted one (refined between the dictionary's grid values, then median-filtered in-plane over
``mtt_median_mm``), also where the area is <= 0.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import ndimage

from ctp_node.errors import NoAIFError, PerfusionError
from ctp_node.perfusion import aif as aif_select
from ctp_node.perfusion import deconvolution as dec
from ctp_node.perfusion import denoise, lesion, low_flow, parametric, reliability, timing, uncertainty, validity
from ctp_node.perfusion.brain_mask import CSF_MAX_HU
from ctp_node.perfusion.brain_mask import brain_mask as find_brain_mask

# Large-vessel to capillary haematocrit (0.45 vs 0.25) and brain density 1.05 g/mL.
DEFAULT_K = (1 - 0.45) / (1 - 0.25) / 1.05
Method = Literal["bsvd", "osvd", "parametric"]
Denoise = Literal["tips", "gaussian", "none"]
DENOISERS = ("tips", "gaussian", "none")
DEFAULT_PIXEL_MM = 1.0
METHODS = ("bsvd", "osvd", "parametric")
OSVD_MAX_INTERVAL_S = 2.0
MAX_COMPLETED_SHARE = 0.5  # a CBV is at most doubled by the completion of its cut-off area
STUDY_SHAPE_MAX_INTERVAL_S = 1.25  # longest acquired interval during the first pass for a study shape


@dataclass(frozen=True)
class PerfusionSettings:
    """Analysis knobs; the defaults follow the conventions in docs/ctp-data.md."""

    k: float = DEFAULT_K
    svd_threshold: float = dec.BSVD_THRESHOLD
    oscillation_index: float = dec.OSVD_INDEX
    grid_step_s: float | None = None  # None: shortest sampling interval, clipped to 0.25..1 s
    aif_min_peak_hu: float = aif_select.MIN_AIF_PEAK_HU
    aif_voxels: int = 12
    vof_scaling: bool = True  # scale the AIF area up to the venous one (partial-volume correction, never down)
    # Noise handling of the tissue curves (the AIF is never filtered): "tips" = model-subspace
    # projection + edge-preserving TIPS bilateral filter (``denoise``), "gaussian" = in-plane
    # Gaussian of ``smoothing_sigma_vox`` voxels, "none".
    denoise: Denoise = "tips"
    smoothing_sigma_vox: float = 0.0
    pixel_mm: float | None = None  # in-plane pixel size for the TIPS filter; None: 1 mm assumed
    csf_max_hu: float = CSF_MAX_HU
    core_rcbf: float = lesion.CORE_RCBF
    hypoperfusion_tmax_s: float = lesion.HYPOPERFUSION_TMAX_S
    severe_tmax_s: float = lesion.SEVERE_TMAX_S
    core_within_hypoperfusion: bool = False
    mask_majority_size: int = 3  # in-plane majority filter of the lesion masks; 1 = raw thresholds
    min_cluster_ml: float = lesion.MIN_CLUSTER_ML  # smaller 3D mask components are dropped
    normal_tmax_s: float = lesion.NORMAL_TMAX_S  # reference tissue for rCBF: Tmax below this
    residue_family: parametric.ResidueFamily = "gamma"  # the model of method="parametric"
    # "study": one gamma shape for the whole study (``parametric.select_shape``) when the bolus was
    # acquired about every second (``STUDY_SHAPE_MAX_INTERVAL_S``), else per voxel; "voxel": each
    # voxel picks among ``parametric.GAMMA_SHAPES`` (biased under noise, see select_shape).
    residue_shape: Literal["study", "voxel"] = "study"
    # method="parametric" with "tips": in-plane median of the fitted MTT over this window (mm; 0 = off)
    # before CBF = CBV / MTT (see ``compute_perfusion``).
    mtt_median_mm: float = 3.0
    # With that median and a study residue shape: Tmax moved along the delay / transit-time ridge by
    # the MTT's change, so that each voxel's fitted centroid (delay + MTT (1 + 1/shape) / 2) is kept.
    # Measured at 6 HU: Tmax's error in normal tissue smaller, medians 0.02-0.13 s later, no narrower in
    # low-flow tissue (docs/benchmarks.md); noise-free it changes nothing.
    tmax_along_ridge: bool = True
    # Volumes the study itself says are unreliable are withheld with the reason (``reliability``):
    # more than this much of a lesion class in the less affected hemisphere (mL; 0 = off) ...
    mirror_limit_ml: float = reliability.MIRROR_LIMIT_ML
    # ... or Tmax volumes from a bolus acquired at longer intervals than this (s; 0 = off) ...
    tmax_max_interval_s: float = reliability.TMAX_MAX_INTERVAL_S
    # ... or the core volume from a bolus acquired at longer intervals than this (s; 0 = off).
    core_max_interval_s: float = reliability.CORE_MAX_INTERVAL_S
    # Per-map validity masks (``validity``): where the data support each map's value. Voxels without
    # measurable enhancement count in no lesion volume (a flat curve is never core). False: all valid.
    validity_masks: bool = True
    # method="parametric" with a study residue shape: CBV completed by the share of the response that
    # falls after the last frame (see ``compute_perfusion``). Off: exact without noise, but at 6 HU
    # it over-corrects low-flow cores (family A core CBV +46 %), whose fitted MTT is still long.
    complete_truncated_area: bool = False
    # method="parametric" with "tips": Tmax of tissue whose flow is below ``low_flow_rcbf`` of normal tissue's
    # from its curves filtered over this wider spatial sigma (mm; 0 = off), see ``low_flow``. Measured at
    # 6 HU: the Tmax > 6 s volume's error from +5.0 to +0.0 mL (issue-shaped set) and -9.3 to -6.5 mL (family
    # A) on the mean; CBF, CBV and MTT unchanged.
    low_flow_tmax_sigma_mm: float = low_flow.SPATIAL_SIGMA_MM
    low_flow_rcbf: float = low_flow.LOW_FLOW_RCBF
    # ... and their CBF: "area", CBV / MTT of the first pass as everywhere else (the default); candidates
    # measured and not adopted (docs/benchmarks.md): "fit", the wide fit's flow amplitude (free of the
    # truncation of slow, delayed curves; biased high on the weakest); "wide", CBV / MTT of the wide
    # curves (less scatter); "widecomplete", that CBV completed by the share of the response after the last
    # frame (``validity.missing_area_fraction``). Each helps one family's core volume and hurts another's.
    low_flow_cbf: Literal["area", "fit", "wide", "widecomplete"] = "area"
    # method="parametric" with "tips": noise-injected replicates of the study (``uncertainty``) give each low-flow
    # voxel's CBF spread (``PerfusionMaps.cbf_sd``) and the core volume's range (``VolumeCheck.noise``); 0 = off.
    uncertainty_replicates: int = uncertainty.REPLICATES
    # ... and the core volume is withheld when those replicates' core volumes spread by more than this (mL,
    # half the 95 % range; 0 = off): noise alone would move it further between two scans (``reliability``).
    noise_limit_ml: float = reliability.NOISE_LIMIT_ML
    # ... and those replicates' shift under noise taken off (``uncertainty``; a candidate, not the default): of the
    # rCBF reference, the median of normal tissue's CBF (a skewed mixture, which noise moves), and of low-flow
    # tissue's CBF (the replicates' mean less their noise-free pass, pooled 3 x 3). Measured at 6 and 10 HU
    # (docs/benchmarks.md): low-flow CBF far less noise-dependent on family B (core CBF +19 -> +10 % at 6 HU,
    # +37 -> -3 % at 10 HU), but the core volumes no better on the whole (family A and the box residues worse),
    # and the reference's shift is underestimated 2-3-fold where the residue model is wrong (box residues).
    noise_bias_correction: bool = False


@dataclass
class PerfusionMaps:
    """Maps (Z, Y, X) float32, masks (Z, Y, X) bool and what the analysis chose."""

    cbf: np.ndarray
    cbv: np.ndarray
    mtt: np.ndarray
    tmax: np.ndarray
    ttp: np.ndarray
    brain_mask: np.ndarray
    tissue_mask: np.ndarray
    core_mask: np.ndarray
    hypoperfusion_mask: np.ndarray
    aif_curve: np.ndarray  # (T,) HU above baseline at the acquisition times (after any VOF scaling)
    aif_voxels: np.ndarray  # (n, 3) int (z, y, x)
    times_s: np.ndarray
    method: str
    k: float
    grid_step_s: float
    arrival_time_s: float
    baseline_frames: np.ndarray
    reference_cbf: float
    vof_scale: float
    voxel_volume_ml: float | None
    core_volume_ml: float | None = None
    hypoperfusion_volume_ml: float | None = None
    severe_hypoperfusion_volume_ml: float | None = None
    mismatch_volume_ml: float | None = None
    hypoperfusion_intensity_ratio: float | None = None
    notes: list[str] = field(default_factory=list)
    noise_hu: float | None = None  # noise per voxel and frame estimated from the baseline (TIPS only)
    aif_selection: aif_select.AIFSelection | None = None  # AIF and VOF voxels, curves and the reasons
    severe_mask: np.ndarray | None = None  # Tmax > 10 s (cleaned like the other masks)
    reference_mask: np.ndarray | None = None  # the normal tissue the rCBF reference came from
    # Per lesion volume ("core", "tmax6", "tmax10"): measured, mirror volume and whether it is withheld.
    # A withheld volume is None in the ``*_volume_ml`` fields (and so are mismatch, ratio and HIR).
    volume_checks: dict[str, reliability.VolumeCheck] = field(default_factory=dict)
    acquired_interval_s: float | None = None  # longest acquired interval during the first pass
    # Per map ("cbf", "cbv", "mtt", "tmax") whether the data support the value, and why not (``validity``).
    validity: validity.MapValidity | None = None
    residue_shape: float | None = None  # the study's gamma residue shape (inf: box), when one was chosen
    # CBF's spread under the study's own noise (``uncertainty``: robust, as a standard deviation), mL/100 g/min,
    # where it was estimated (``cbf_sd_evaluated``: where a core can form, around flow below
    # ``uncertainty.BAND_RCBF`` of the reference); 0 elsewhere.
    cbf_sd: np.ndarray | None = None
    cbf_sd_evaluated: np.ndarray | None = None
    # With ``noise_bias_correction``: what was taken off those voxels' CBF (mL/100 g/min; 0 elsewhere), and the
    # reference before its correction (``reference_cbf`` is the one the core threshold used).
    cbf_noise_bias: np.ndarray | None = None
    reference_cbf_measured: float | None = None

    @property
    def valid_masks(self) -> dict[str, np.ndarray]:
        """Map name -> (Z, Y, X) bool, True where the value is supported (all tissue when not assessed)."""
        if self.validity is None:
            return {name: self.tissue_mask.copy() for name in validity.MAP_NAMES}
        return self.validity.masks()

    @property
    def withheld(self) -> dict[str, str]:
        """Volume name -> why it is not reported."""
        return {name: c.withheld for name, c in self.volume_checks.items() if c.withheld}

    def withhold(self, name: str, reason: str) -> None:
        """Withhold one more volume (e.g. the guardrail's verdict on a synthetic series), with its reason."""
        check = self.volume_checks[name]
        joined = reason if not check.withheld else f"{check.withheld}; {reason}"
        self.volume_checks[name] = dataclasses.replace(check, withheld=joined)
        self.notes.append(f"{reliability.LABELS[name]} volume withheld: {reason}")
        if self.voxel_volume_ml is not None:
            _fill_volumes(self)

    @property
    def measured_volumes_ml(self) -> dict[str, float | None]:
        """Every lesion volume as measured, withheld or not (for evaluation; never for a report)."""
        return {name: c.measured_ml for name, c in self.volume_checks.items()}

    @property
    def vof_voxels(self) -> np.ndarray:
        """(m, 3) int (z, y, x) of the venous output function; empty when none was found."""
        vof = None if self.aif_selection is None else self.aif_selection.vof
        return np.zeros((0, 3), dtype=np.int64) if vof is None else vof.voxels

    @property
    def mismatch_ratio(self) -> float | None:
        """Tmax > 6 s volume / core volume; None without volumes or with no core."""
        if self.hypoperfusion_volume_ml is None or not self.core_volume_ml:
            return None
        return self.hypoperfusion_volume_ml / self.core_volume_ml

    def summary(self) -> dict:
        """JSON-ready scalars: volumes, reference values, the AIF and how it was found."""
        keys = (
            "method", "k", "grid_step_s", "arrival_time_s", "reference_cbf", "vof_scale", "voxel_volume_ml",
            "core_volume_ml", "hypoperfusion_volume_ml", "severe_hypoperfusion_volume_ml",
            "mismatch_volume_ml", "hypoperfusion_intensity_ratio", "notes", "noise_hu", "acquired_interval_s",
            "residue_shape", "reference_cbf_measured",
        )  # fmt: skip
        out = {key: getattr(self, key) for key in keys}
        out["notes"] = list(self.notes)
        out["baseline_frames"] = [int(i) for i in self.baseline_frames]
        out["times_s"] = [float(t) for t in self.times_s]
        out["aif_curve_hu"] = [round(float(v), 3) for v in self.aif_curve]
        out["aif_voxels_zyx"] = self.aif_voxels.tolist()
        out["brain_voxels"] = int(self.brain_mask.sum())
        out["mismatch_ratio"] = self.mismatch_ratio
        out["volume_checks"] = {name: check.summary() for name, check in self.volume_checks.items()}
        if self.aif_selection is not None:
            out["input_functions"] = self.aif_selection.summary()
        if self.validity is not None:
            out["validity"] = self.validity.summary(self.tissue_mask)
        return out


def compute_perfusion(
    hu: np.ndarray,
    times_s: np.ndarray,
    voxel_volume_ml: float | None = None,
    method: Method = "parametric",
    brain_mask: np.ndarray | None = None,
    aif_mask: np.ndarray | None = None,
    settings: PerfusionSettings | None = None,
    acquired_times_s: np.ndarray | None = None,
) -> PerfusionMaps:
    """Perfusion maps of a (T, Z, Y, X) HU series acquired at ``times_s`` (s, any sampling).

    ``brain_mask`` / ``aif_mask`` (Z, Y, X) bool override the automatic ones. ``voxel_volume_ml``
    turns voxel counts into the summary volumes (None: volumes are not reported).
    ``acquired_times_s``: when some frames are estimates (a series completed by inpainting), the
    times of the frames the scanner acquired; the sampling check of ``reliability`` uses them.
    Volumes the study itself shows to be unreliable are withheld (``PerfusionMaps.volume_checks``).
    """
    cfg = settings or PerfusionSettings()
    if method not in METHODS:
        raise PerfusionError(f"unknown deconvolution method {method!r}: use one of {', '.join(METHODS)}")
    if cfg.denoise not in DENOISERS:
        raise PerfusionError(f"unknown noise handling {cfg.denoise!r}: use one of {', '.join(DENOISERS)}")
    if cfg.low_flow_cbf not in low_flow.CBF_MODES:
        raise PerfusionError(f"unknown low_flow_cbf {cfg.low_flow_cbf!r}: use one of {', '.join(low_flow.CBF_MODES)}")
    times = timing.validate_series(hu, times_s)
    hu = np.asarray(hu, dtype=np.float32)
    if not np.isfinite(hu.sum(dtype=np.float64)):
        raise PerfusionError("the series contains NaN or inf voxels: fill or mask them before analysis")
    notes: list[str] = []
    redundant = timing.interpolated_frames(hu, times)
    if redundant.any() and int((~redundant).sum()) >= timing.MIN_FRAMES:
        # Frames interpolated from their neighbours repeat their noise: analyse the acquired ones.
        kept = int((~redundant).sum())
        notes.append(f"{int(redundant.sum())} of {times.size} frames are linear interpolations: analysed {kept}")
        hu, times = hu[~redundant], times[~redundant]
    shape = hu.shape[1:]
    brain_given = _check_mask(brain_mask, shape, "brain_mask")
    aif_given = _check_mask(aif_mask, shape, "aif_mask")

    # 1. Bolus arrival and the pre-contrast baseline S0.
    soft = brain_given if brain_given is not None else (hu[0] > -50) & (hu[0] < 150)
    arrival = timing.detect_bolus_arrival(hu, times, soft)
    baseline = hu[arrival.baseline_frames].mean(axis=0)
    brain = brain_given if brain_given is not None else find_brain_mask(baseline)
    if not brain.any():
        raise PerfusionError("the brain mask is empty: is the series in HU (air -1000, brain 20-40)?")

    # 2. Concentration curves of the brain voxels, (V, T) and on the uniform grid (V, N).
    step = cfg.grid_step_s or timing.default_grid_step(times)
    grid = timing.uniform_grid(times, step)
    interp = timing.interpolation_matrix(times, grid).astype(np.float32)
    flat_index = np.flatnonzero(brain)
    peak = hu.max(axis=0) - baseline
    tissue_hu = hu
    # Parenchyma only is filtered: CSF has no signal to give and vessels hundreds of HU to smear.
    # CSF vs tissue on the mean of all frames, not on S0: CSF does not enhance, so its mean is its
    # baseline with less noise, and tissue's only rises. With 1-2 baseline frames (4-8 s sampling)
    # S0's noise put several % of white matter below the CSF threshold, outside the fit (MTT 0).
    level = hu.mean(axis=0)
    parenchyma = brain & (level > cfg.csf_max_hu) & (peak < cfg.aif_min_peak_hu)
    if cfg.denoise == "gaussian" and cfg.smoothing_sigma_vox > 0:
        tissue_hu = _smooth_in_mask(hu, parenchyma, cfg.smoothing_sigma_vox)
    conc = _curves(tissue_hu, baseline, flat_index)  # (V, T)
    same_grid = interp.shape[0] == interp.shape[1] and np.array_equal(interp, np.eye(interp.shape[0]))
    # On the acquisition grid the curves are the grid curves: no copy (1.2 M brain voxels x 61 frames
    # at 512 x 512 x 16 are 290 MB). Nothing below writes into ``conc_grid`` while ``conc`` is still read:
    # the TIPS path replaces it in place and then no longer uses ``conc``.
    conc_grid = conc if same_grid else conc @ interp.T  # (V, N)

    # 3. Arterial input function (and the venous partial-volume correction), from the unsmoothed series.
    selection = aif_select.select_input_functions(
        hu, baseline, brain, interp, grid, arrival.time_s, cfg.pixel_mm or DEFAULT_PIXEL_MM, cfg.aif_min_peak_hu,
        cfg.aif_voxels, cfg.vof_scaling, aif_given,
    )  # fmt: skip
    aif_curve, vof_scale = selection.curve, selection.pvc_scale
    aif_grid = interp @ aif_curve.astype(np.float64)
    aif_area = float(aif_grid.sum())
    if aif_area <= 0:
        raise NoAIFError("the arterial input curve has no positive area: check aif_mask and the baseline")

    noise_hu, basis, fitted_mtt, residue_shape, unfiltered = None, None, None, None, None
    first_tmax_volume = None
    acquired = times if acquired_times_s is None else np.asarray(acquired_times_s, dtype=np.float64)
    # One residue shape for the study only where the scanner sampled the bolus about every second:
    # that is where it was measured to help (docs/benchmarks.md). Every 2 s it helped family A
    # (white-matter CBF +4..+9 % against -20..-23 % with a shape per voxel) and hurt the issue-shaped
    # family B (+15..+41 % against 0..+16 %); every 4 s it hurt (+9..+85 % against -16..+34 %): with
    # few frames in the first pass the shape cannot be told even pooled. Sparser: each voxel chooses.
    acquired_interval_s = reliability.bolus_interval_s(acquired, arrival.time_s)
    study_shape = (
        method == "parametric"
        and cfg.residue_family == "gamma"
        and cfg.residue_shape == "study"
        and acquired_interval_s <= STUDY_SHAPE_MAX_INTERVAL_S
    )
    block_px = parametric.SHAPE_BLOCK_MM / (cfg.pixel_mm or DEFAULT_PIXEL_MM)
    noise = denoise.estimate_noise(hu, arrival.baseline_frames, parenchyma)  # TIPS and the validity masks
    if cfg.denoise == "tips":
        keep = method == "parametric" and (cfg.low_flow_tmax_sigma_mm > 0 or cfg.uncertainty_replicates > 0)
        conc_grid, note, noise_hu, basis, unfiltered = _tips(
            hu, conc_grid, brain, parenchyma, flat_index, interp, grid, aif_grid, arrival, cfg, times, noise, keep
        )
        notes.append(note)
        del conc  # overwritten by the filtered curves (the same array on the acquisition grid)

    # 4. Deconvolution and the maps.
    if method == "bsvd":
        stats = dec.deconvolve_bsvd(conc_grid, aif_grid, step, threshold=cfg.svd_threshold)
    elif method == "osvd":
        stats = dec.deconvolve_osvd(conc_grid, aif_grid, step, oscillation_bound=cfg.oscillation_index)
    elif cfg.denoise == "tips":
        # The filtered curves live on the uniform grid.
        # Parenchyma only: CSF has no flow and vessel voxels are not tissue (their CBV is kept).
        fit = parenchyma.reshape(-1)[flat_index]
        part, mtt_part = parametric.deconvolve_parametric(
            conc_grid[fit],
            grid,
            aif_grid,
            cfg.residue_family,
            basis=basis,
            arrival_s=arrival.time_s,
            acquired_s=times,
            shape="study" if study_shape else None,
            shape_groups=_blocks(flat_index[fit], shape, block_px) if study_shape else None,
        )
        residue_shape = part.residue_shape
        stats = dec.ResidueStats(flow=np.zeros(fit.size), tmax_s=np.zeros(fit.size))
        stats.flow[fit], stats.tmax_s[fit] = part.flow, part.tmax_s
        if unfiltered is not None and part.first_tmax_s is not None:
            first_tmax = np.zeros(fit.size)
            first_tmax[fit] = part.first_tmax_s
            first_tmax_volume = _to_volume(first_tmax, flat_index, shape)  # the baselines the replicates keep
        fitted_mtt = np.zeros(fit.size)
        fitted_mtt[fit] = mtt_part
        conc_grid[fit] -= part.offset_hu[:, None].astype(np.float32)
        size = denoise.median_window(cfg.mtt_median_mm, cfg.pixel_mm or DEFAULT_PIXEL_MM)
        if size:
            # A voxel's curve pins down d + MTT (1 + 1/shape) / 2 far better than MTT itself: delay,
            # residue shape and transit time trade off, so under noise the fitted MTT scatters with
            # heavy tails (interquartile range +-35 % in a 6 HU core) and CBF = CBV / MTT inherits it.
            # A median within the fitted parenchyma removes the tails and leaves edges in place.
            mtt_volume = _to_volume(fitted_mtt, flat_index, shape)
            median = denoise.median_in_mask(mtt_volume, mtt_volume > 0, size)
            filtered_mtt = np.where(fitted_mtt > 0, median.reshape(-1)[flat_index], 0.0)
            if cfg.tmax_along_ridge and residue_shape is not None:
                # The curve fixes the centroid; the delay the fit paired with a noisy MTT scatters the
                # opposite way (a too-long MTT comes with a too-early delay). Keep the centroid with the
                # filtered MTT: delay' = delay + (MTT - MTT') (1 + 1/shape) / 2.
                factor = 0.5 * (1.0 + (0.0 if np.isinf(residue_shape) else 1.0 / residue_shape))
                moved = stats.tmax_s + (fitted_mtt - filtered_mtt) * factor
                stats.tmax_s[:] = np.where(fitted_mtt > 0, np.maximum(moved, 0.0), stats.tmax_s)
            fitted_mtt = filtered_mtt
    else:
        # Fitted at the acquisition times themselves: no resampling of the tissue curves. The curves
        # are the whole brain's; only parenchyma chooses the shape (CSF is flat, vessels arterial).
        groups = None
        if study_shape:
            groups = np.where(parenchyma.reshape(-1)[flat_index], _blocks(flat_index, shape, block_px), -1)
        stats, _ = parametric.deconvolve_parametric(
            conc, times, aif_curve, cfg.residue_family, shape="study" if study_shape else None,
            arrival_s=arrival.time_s if study_shape else None, shape_groups=groups,
        )  # fmt: skip
        residue_shape = stats.residue_shape
    cbf_v = cfg.k * stats.flow * 6000.0
    cbv_v = cfg.k * 100.0 * conc_grid.sum(axis=1, dtype=np.float64) / aif_area
    if cfg.complete_truncated_area and fitted_mtt is not None and residue_shape is not None:
        # The area ratio misses the part of each voxel's response to the AIF that falls after the last
        # frame: nothing when the AIF returns to baseline well before it, a quarter of a delayed, slow
        # core's area when the AIF keeps a recirculation plateau (family A, noise-free: core CBV -27 %).
        # The missing share follows from the voxel's fitted delay and transit time, the study's residue
        # shape and the measured AIF. Noise-free it is exact (family A: every region within 2 %); at
        # 6 HU the low-flow core's fitted MTT is still long (MTT and delay trade off where the signal
        # is 1-3 HU) and the completion over-corrects it (family A core CBV +46 %): off by default.
        fitted = fitted_mtt > 0
        missing = validity.missing_area_fraction(aif_grid, grid, fitted_mtt, stats.tmax_s, fitted, residue_shape)
        cbv_v = np.where(fitted, cbv_v / (1.0 - np.minimum(missing, MAX_COMPLETED_SHARE)), cbv_v)
    with np.errstate(divide="ignore", invalid="ignore"):
        if fitted_mtt is not None:
            # Central volume theorem with the area CBV (linear in the data) and the fitted MTT: at
            # low signal the fitted amplitude is biased high (the best of many atoms fits some
            # noise), the area is not. (Completing the area of curves cut off by the end of the
            # series with the model was tried: exact without noise, over-corrects with it.)
            cbf_v = np.where(fitted_mtt > 0, cbv_v / np.where(fitted_mtt > 0, fitted_mtt, 1.0) * 60.0, 0.0)
            cbf_v = np.maximum(cbf_v, 0.0)
        mtt_v = np.where(cbf_v > 1e-3, cbv_v / cbf_v * 60.0, 0.0)
        if fitted_mtt is not None:
            # The fitted transit time is the curve's shape, defined where the area (CBV) is not: a
            # noisy low-flow voxel whose area comes out <= 0 still has a fitted MTT (CBF is 0 there).
            mtt_v = np.where(fitted_mtt > 0, fitted_mtt, mtt_v)
    ttp_v = grid[np.argmax(conc_grid, axis=1)] - times[0]

    per_voxel = {"cbf": cbf_v, "cbv": cbv_v, "mtt": mtt_v, "tmax": stats.tmax_s, "ttp": ttp_v}
    maps = {name: _to_volume(values, flat_index, shape) for name, values in per_voxel.items()}
    tissue = lesion.parenchyma_mask(brain, level, maps["cbv"], cfg.csf_max_hu)
    if unfiltered is not None and fitted_mtt is not None and cfg.low_flow_tmax_sigma_mm > 0:
        # Low-flow tissue's Tmax from a wider neighbourhood (``low_flow``): its own curves are too weak.
        fitted = _to_volume(fitted_mtt, flat_index, shape) > 0
        slow = low_flow.low_flow_voxels(
            tissue & parenchyma, fitted, maps["cbf"], maps["tmax"], cfg.hypoperfusion_tmax_s, cfg.normal_tmax_s,
            cfg.low_flow_rcbf,
        )  # fmt: skip
        targets = np.flatnonzero(slow)
        study = parametric.StudyFit(grid, aif_grid, arrival.time_s, times, cfg.residue_family, residue_shape)
        wide = low_flow.wide_fit(unfiltered, targets, study, cfg.low_flow_tmax_sigma_mm)
        if wide is not None:
            maps["tmax"].reshape(-1)[targets] = wide.tmax_s
            what = "Tmax"
            if cfg.low_flow_cbf != "area":
                maps["cbf"].reshape(-1)[targets] = low_flow.wide_cbf(
                    wide, cfg.low_flow_cbf, cfg.k, aif_grid, grid, residue_shape, MAX_COMPLETED_SHARE
                )
                what = "CBF and Tmax"
            notes.append(
                f"{what} of {targets.size} low-flow voxels (CBF below {cfg.low_flow_rcbf:g} of normal tissue's) "
                f"from curves filtered over {cfg.low_flow_tmax_sigma_mm:g} mm"
            )

    # 5. Core and hypoperfusion.
    def lesion_masks(
        cbf: np.ndarray, measurable: np.ndarray | None = None, reference_cbf: float | None = None
    ) -> lesion.LesionMasks:
        return lesion.lesion_masks(
            tissue, cbf, maps["tmax"], cfg.core_rcbf, cfg.hypoperfusion_tmax_s, cfg.severe_tmax_s,
            cfg.core_within_hypoperfusion, cfg.mask_majority_size, voxel_volume_ml, cfg.min_cluster_ml,
            cfg.normal_tmax_s, measurable=measurable, reference_cbf=reference_cbf,
        )  # fmt: skip

    masks = lesion_masks(maps["cbf"])
    checked = validity.all_valid(tissue)
    invalid_ml: dict[str, float] = {}
    if cfg.validity_masks:
        checked = _validity(hu, baseline, times, grid, arrival, tissue, maps, masks, noise, aif_grid, method, cfg)
        if not checked.enhancing[tissue].all():
            # Voxels without measurable enhancement neither count nor vote: the masks again without them.
            unchecked = masks
            masks = lesion_masks(maps["cbf"], checked.enhancing)
            if voxel_volume_ml is not None:
                before = {"core": unchecked.core, "tmax6": unchecked.hypoperfusion, "tmax10": unchecked.severe}
                invalid_ml = {k: float((m & ~checked.enhancing).sum()) * voxel_volume_ml for k, m in before.items()}
        if not all(mask[tissue].all() for mask in checked.masks().values()):
            notes.append(checked.note(tissue))
    spread, core_noise, reference_measured = None, None, None
    if unfiltered is not None and first_tmax_volume is not None and cfg.uncertainty_replicates > 0:
        voters = tissue & checked.enhancing if cfg.validity_masks else tissue
        study = parametric.StudyFit(grid, aif_grid, arrival.time_s, times, cfg.residue_family, residue_shape)
        spread, reference, step_notes = _noise_step(
            unfiltered, maps["cbf"], masks, tissue & parenchyma, voters, study, cfg, first_tmax_volume
        )  # fmt: skip
        notes.extend(step_notes)
        if cfg.noise_bias_correction and (reference != masks.reference_cbf or spread is not None):
            # The masks again, on the corrected flows and reference (the reference voxels do not change).
            reference_measured = masks.reference_cbf
            masks = lesion_masks(maps["cbf"], checked.enhancing if cfg.validity_masks else None, reference)
        if spread is not None:
            core_noise, note = _core_range(spread, maps["cbf"], masks, voters, voxel_volume_ml, cfg)
            if note:
                notes.append(note)
    del unfiltered
    result = PerfusionMaps(
        **maps, brain_mask=brain, tissue_mask=tissue, core_mask=masks.core,
        hypoperfusion_mask=masks.hypoperfusion, aif_curve=aif_curve.astype(np.float32),
        aif_voxels=selection.aif.voxels, times_s=times,
        method=method, k=cfg.k, grid_step_s=step, arrival_time_s=arrival.time_s,
        baseline_frames=arrival.baseline_frames, reference_cbf=masks.reference_cbf, vof_scale=vof_scale,
        voxel_volume_ml=voxel_volume_ml,
        hypoperfusion_intensity_ratio=lesion.hypoperfusion_intensity_ratio(masks), notes=notes,
        noise_hu=noise_hu, aif_selection=selection, severe_mask=masks.severe, reference_mask=masks.reference,
        validity=checked if cfg.validity_masks else None, residue_shape=residue_shape,
    )  # fmt: skip
    if spread is not None:
        result.cbf_sd = np.zeros(shape, dtype=np.float32)
        result.cbf_sd.reshape(-1)[spread.targets] = spread.sd
        result.cbf_sd_evaluated = np.zeros(shape, dtype=bool)
        result.cbf_sd_evaluated.reshape(-1)[spread.targets] = True
        if spread.bias is not None:
            result.cbf_noise_bias = np.zeros(shape, dtype=np.float32)
            result.cbf_noise_bias.reshape(-1)[spread.targets] = spread.bias
    result.reference_cbf_measured = reference_measured
    if residue_shape is not None:
        notes.append(f"residue: gamma shape {residue_shape:g} for the whole study (1 = exponential, inf = box)")
    elif method == "parametric" and cfg.residue_family == "gamma" and cfg.residue_shape == "study":
        why = "too little normal tissue to choose one" if study_shape else "the bolus was sampled too sparsely"
        notes.append(f"residue: shape chosen per voxel ({why} for one shape for the study)")
    result.acquired_interval_s = acquired_interval_s
    result.volume_checks = reliability.check_volumes(
        {"core": masks.core, "tmax6": masks.hypoperfusion, "tmax10": masks.severe}, tissue, voxel_volume_ml,
        result.acquired_interval_s, cfg.mirror_limit_ml, cfg.tmax_max_interval_s, cfg.core_max_interval_s,
        invalid_ml=invalid_ml if cfg.validity_masks and voxel_volume_ml is not None else None,
        noise=None if core_noise is None else {"core": core_noise}, noise_limit_ml=cfg.noise_limit_ml,
    )  # fmt: skip
    if voxel_volume_ml is not None:
        _fill_volumes(result)
        result.notes.extend(reliability.withheld_notes(result.volume_checks))
    if np.ptp(np.diff(times)) > 1e-3:
        result.notes.append(f"non-uniform sampling: curves linearly resampled to a {step:g} s grid")
    if method == "osvd" and np.max(np.diff(times)) > OSVD_MAX_INTERVAL_S:
        result.notes.append(
            "oSVD on intervals over 2 s: linearly interpolated curves look smooth to the oscillation "
            "index, which then under-regularises (Tmax several seconds late at 8 s sampling); prefer bsvd"
        )
    return result


def _tips(
    hu: np.ndarray,
    conc_grid: np.ndarray,
    brain: np.ndarray,
    parenchyma: np.ndarray,
    flat_index: np.ndarray,
    interp: np.ndarray,
    grid: np.ndarray,
    aif_grid: np.ndarray,
    arrival: timing.BolusArrival,
    cfg: PerfusionSettings,
    times: np.ndarray,
    noise: denoise.NoiseEstimate,
    keep_unfiltered: bool = False,
) -> tuple[np.ndarray, str, float, np.ndarray, low_flow.UnfilteredCurves | None]:
    """Parenchyma curves projected on the model subspace and TIPS-filtered (``denoise``); with
    ``keep_unfiltered``, also their unfiltered coefficients (for ``low_flow``: one more (K, Z, Y, X) array)."""
    shape = brain.shape
    basis = denoise.model_basis(grid, aif_grid, acquired_s=times).astype(np.float32)  # (K, N)
    rows = np.flatnonzero(parenchyma.reshape(-1)[flat_index])  # parenchyma rows of conc_grid
    coef = np.zeros((basis.shape[0], int(np.prod(shape))), dtype=np.float32)
    coef[:, flat_index[rows]] = (conc_grid[rows] @ basis.T).T
    coef = coef.reshape(basis.shape[0], *shape)
    pixel = cfg.pixel_mm or DEFAULT_PIXEL_MM
    noise_cov = denoise.coefficient_noise_cov(basis, interp, arrival.baseline_frames, hu.shape[0])
    # Computed here (not inside the filter) when kept: the noise-injected replicates (``uncertainty``) weigh curve
    # differences on the study's own scales.
    scales = denoise.range_scales(coef, parenchyma, noise, pixel, noise_cov=noise_cov) if keep_unfiltered else None
    filtered = denoise.tips_filter(
        coef,
        parenchyma,
        noise,
        pixel,
        denoise.SPATIAL_SIGMA_MM,
        noise_cov=noise_cov,
        overwrite=not keep_unfiltered,
        scales=scales,
    ).reshape(basis.shape[0], -1)
    unfiltered = None
    if keep_unfiltered:
        unfiltered = low_flow.UnfilteredCurves(
            coefficients=coef,
            basis=basis,
            mask=parenchyma,
            noise=noise,
            noise_cov=noise_cov,
            pixel_mm=pixel,
            filtered=filtered.reshape(coef.shape),
            scales=scales,
        )
    # Written into the caller's curves (which it owns and no longer needs): a second (V, N) array would be
    # 290 MB at 512 x 512. One product over all rows, not chunks: float32 BLAS sums in another order when
    # the rows are split, and the fit's choice of atom follows the last bit in a few voxels.
    out = conc_grid if conc_grid.dtype == np.float32 else conc_grid.astype(np.float32)
    out[rows] = filtered[:, flat_index[rows]].T @ basis
    note = (
        f"noise {noise.sigma_hu:.1f} HU (baseline); tissue curves projected on {basis.shape[0]} model components "
        f"and TIPS-filtered (spatial sigma {denoise.SPATIAL_SIGMA_MM:g} mm at {pixel:g} mm pixels"
        f"{'' if cfg.pixel_mm else ', pixel size assumed'})"
    )
    return out, note, noise.sigma_hu, basis, unfiltered


def _noise_step(
    curves: low_flow.UnfilteredCurves,
    cbf: np.ndarray,
    masks: lesion.LesionMasks,
    fitted_tissue: np.ndarray,
    voters: np.ndarray,
    study: parametric.StudyFit,
    cfg: PerfusionSettings,
    first_tmax: np.ndarray,
) -> tuple[uncertainty.CbfSpread | None, float, list[str]]:
    """What the study's own noise does to the core's flows (``uncertainty``): low-flow tissue's CBF over the
    replicates (the spread) and, with ``cfg.noise_bias_correction``, the rCBF reference and those flows less
    what the noise adds to them (``cbf`` is corrected in place). Returns the spread, the reference the masks
    use and the notes. ``voters``: the tissue the lesion masks' majority vote counts (``lesion.lesion_masks``);
    ``first_tmax`` (Z, Y, X): the study fit's first-pass delays (``uncertainty.cbf_spread``)."""
    reference = masks.reference_cbf
    if cfg.low_flow_cbf != "area" or cfg.complete_truncated_area:
        why = "the replicates follow the default CBF (area / fitted MTT) only"
        return None, reference, [f"CBF spread not estimated: {why}"]
    if not (np.isfinite(reference) and reference > 0):
        return None, reference, ["CBF spread not estimated: no normally perfused reference tissue"]
    notes: list[str] = []
    size = denoise.median_window(cfg.mtt_median_mm, cfg.pixel_mm or DEFAULT_PIXEL_MM)
    if cfg.noise_bias_correction and masks.reference is not None:
        # The reference is the median of a skewed mixture (white and grey matter, CBF's heavy upper tail under
        # noise): noise moves it, by +9 % on family A and +36 % on box residues at 6 HU (docs/benchmarks.md).
        sample = uncertainty.reference_sample(masks.reference, fitted_tissue)
        normal = uncertainty.cbf_spread(
            curves, sample, fitted_tissue, study, cfg.k, size, first_tmax, cfg.uncertainty_replicates,
            noise_free_pass=True,
        )  # fmt: skip
        shift = None if normal is None else uncertainty.median_shift(normal)
        if shift is not None and abs(shift) > uncertainty.MAX_REFERENCE_SHIFT * reference:
            notes.append(
                f"rCBF reference not corrected for noise: the replicates moved its median by {shift:+.1f} "
                f"mL/100 g/min, more than {uncertainty.MAX_REFERENCE_SHIFT:.0%} of it"
            )
        elif shift is not None:
            notes.append(
                f"rCBF reference {reference - shift:.1f} mL/100 g/min: normal tissue's median CBF {reference:.1f} "
                f"less the {shift:+.1f} the study's own noise adds to it ({cfg.uncertainty_replicates} replicates)"
            )
            reference -= shift
    # Where a replicate's core can lie: the core is cleaned by the same majority vote, and a voxel whose
    # neighbourhood mostly reads above BAND_RCBF would need most of it misread by half. So: the majority of the
    # voxels below BAND_RCBF (isolated noisy voxels out), widened by one voxel (its rim can still flip).
    candidates = lesion.majority(voters & (cbf < uncertainty.BAND_RCBF * reference), voters, cfg.mask_majority_size)
    reach = max(cfg.mask_majority_size // 2, 1)
    region = ndimage.binary_dilation(candidates, np.ones((1, 2 * reach + 1, 2 * reach + 1), bool)) & voters
    region &= fitted_tissue
    spread = uncertainty.cbf_spread(
        curves, np.flatnonzero(region), fitted_tissue, study, cfg.k, size, first_tmax, cfg.uncertainty_replicates,
        noise_free_pass=cfg.noise_bias_correction,
    )  # fmt: skip
    if spread is None:
        return None, reference, [*notes, "CBF spread not estimated: no low-flow tissue or no noise measured"]
    notes.append(
        f"CBF spread of {spread.targets.size} voxels at or near flow below {uncertainty.BAND_RCBF:g} of the "
        f"reference from {spread.replicates} replicates of the study with its own noise added"
    )
    if spread.bias is not None:
        flat = cbf.reshape(-1)
        flat[spread.targets] = np.maximum(flat[spread.targets] - spread.bias, 0.0)
        notes.append(
            f"CBF of those voxels less what the noise adds to it (median {float(np.median(spread.bias)):+.2f} "
            "mL/100 g/min; CBV and MTT as fitted)"
        )
    return spread, reference, notes


def _core_range(
    spread: uncertainty.CbfSpread,
    cbf: np.ndarray,
    masks: lesion.LesionMasks,
    voters: np.ndarray,
    voxel_volume_ml: float | None,
    cfg: PerfusionSettings,
) -> tuple[reliability.NoiseRange | None, str]:
    """The core volume's range over the replicates of ``spread`` (each less the same noise bias as the study's
    flows when those were corrected) and the core counted apart whose per-voxel interval reaches the
    threshold; and the note."""
    if voxel_volume_ml is None:
        return None, ""
    threshold = cfg.core_rcbf * masks.reference_cbf
    reach = max(cfg.mask_majority_size // 2, 1)
    # Every replicate's core lies inside the evaluated region (``_noise_step``): its masks are cleaned on a box
    # around it, with the majority vote's reach to spare.
    zs, ys, xs = np.unravel_index(spread.targets, cbf.shape)
    box = (
        slice(int(zs.min()), int(zs.max()) + 1),
        slice(max(int(ys.min()) - reach, 0), int(ys.max()) + reach + 1),
        slice(max(int(xs.min()) - reach, 0), int(xs.max()) + reach + 1),
    )
    local = np.ravel_multi_index(tuple(i - b.start for i, b in zip((zs, ys, xs), box, strict=True)), cbf[box].shape)
    hypo = masks.hypoperfusion[box] if cfg.core_within_hypoperfusion else None
    min_voxels = lesion.min_cluster_voxels(voxel_volume_ml, cfg.min_cluster_ml)
    offset = 0.0 if spread.bias is None else spread.bias
    volumes = []
    for values in spread.values:
        trial = cbf[box].copy()
        trial.reshape(-1)[local] = np.maximum(values - offset, 0.0)
        low = trial < threshold if hypo is None else (trial < threshold) & hypo
        core = lesion.clean_mask(low, voters[box], cfg.mask_majority_size, min_voxels)
        volumes.append(float(core.sum()) * voxel_volume_ml)
    measured = float(masks.core.sum()) * voxel_volume_ml
    half = uncertainty.Z_INTERVAL * float(np.std(volumes, ddof=1)) if len(volumes) > 1 else 0.0
    # Counted apart: core voxels whose flow, at the upper end of its own 95 % interval, reaches the threshold.
    upper = cbf.copy()
    upper.reshape(-1)[spread.targets] += uncertainty.Z_INTERVAL * spread.sd
    uncertain = float((masks.core & (upper >= threshold)).sum()) * voxel_volume_ml
    noise = reliability.NoiseRange(
        low_ml=max(measured - half, 0.0), high_ml=measured + half, uncertain_ml=uncertain, replicates=len(volumes)
    )
    return noise, (
        f"core {measured:.1f} mL, {noise.low_ml:.1f}-{noise.high_ml:.1f} mL over the replicates (95 %); "
        f"{uncertain:.1f} mL of it within its voxels' own noise of the {cfg.core_rcbf:g} rCBF threshold"
    )


def _validity(
    hu: np.ndarray,
    baseline: np.ndarray,
    times: np.ndarray,
    grid: np.ndarray,
    arrival: timing.BolusArrival,
    tissue: np.ndarray,
    maps: dict[str, np.ndarray],
    masks: lesion.LesionMasks,
    noise: denoise.NoiseEstimate,
    aif_grid: np.ndarray,
    method: str,
    cfg: PerfusionSettings,
) -> validity.MapValidity:
    """The per-map validity masks (``validity``), with this analysis' low-flow candidates and fit range."""
    reference = masks.reference_cbf
    if np.isfinite(reference):
        low_flow = lesion.majority(maps["cbf"] < cfg.core_rcbf * reference, tissue, cfg.mask_majority_size)
    else:
        low_flow = np.zeros(tissue.shape, dtype=bool)
    max_tmax = None
    if method == "parametric":
        # The fit's largest delay (its last grid cell): a Tmax there is "at least this", not a value.
        delays = parametric.GAMMA_DELAY_GRID_S if cfg.residue_family == "gamma" else parametric.DELAY_GRID_S
        max_tmax = float(delays[-1] - 0.5 * (delays[1] - delays[0]))
    return validity.assess(
        hu=hu, baseline=baseline, times_s=times, grid_s=grid, baseline_frames=arrival.baseline_frames,
        tissue=tissue, low_flow=low_flow, noise_sigma_hu=noise.sigma_hu, noise_image=noise.noise_image,
        pixel_mm=cfg.pixel_mm or DEFAULT_PIXEL_MM, aif_grid=aif_grid, mtt=maps["mtt"], tmax=maps["tmax"],
        max_tmax_s=max_tmax,
    )  # fmt: skip


def _fill_volumes(result: PerfusionMaps) -> None:
    """The reported volumes: None where ``volume_checks`` withholds them, and then also what is built on them."""
    checks = result.volume_checks
    result.core_volume_ml = checks["core"].reported_ml
    result.hypoperfusion_volume_ml = checks["tmax6"].reported_ml
    result.severe_hypoperfusion_volume_ml = checks["tmax10"].reported_ml
    core, tmax6 = result.core_volume_ml, result.hypoperfusion_volume_ml
    result.mismatch_volume_ml = None if core is None or tmax6 is None else tmax6 - core
    severe = result.severe_hypoperfusion_volume_ml
    result.hypoperfusion_intensity_ratio = None if tmax6 is None or severe is None or tmax6 <= 0 else severe / tmax6


def _check_mask(mask: np.ndarray | None, shape: tuple[int, ...], name: str) -> np.ndarray | None:
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise PerfusionError(f"{name} has shape {mask.shape}, but the volumes are {shape} (Z, Y, X)")
    return mask.astype(bool)


def _curves(hu: np.ndarray, baseline: np.ndarray, flat_index: np.ndarray) -> np.ndarray:
    """Enhancement S - S0 of the given voxels, (V, T) float32, filled frame by frame (the gathered
    frames, their difference and its transpose were three (V, T) arrays at once)."""
    base = baseline.reshape(-1)[flat_index].astype(np.float32)
    out = np.empty((flat_index.size, hu.shape[0]), dtype=np.float32)
    for t in range(hu.shape[0]):
        out[:, t] = np.asarray(hu[t], dtype=np.float32).reshape(-1)[flat_index] - base
    return out


def _blocks(flat: np.ndarray, shape: tuple[int, ...], size_px: float) -> np.ndarray:
    """Label of each flat (Z, Y, X) index: 2 b + h for the in-plane ``size_px`` square block b and its
    half h, the half a checkerboard of tiles a quarter of the block wide (the TIPS filter correlates
    neighbours within about 2 mm; tiles of 3 mm at 12 mm blocks keep most of that within a half)."""
    size = max(2, int(round(size_px)))
    tile = max(1, size // 4)
    z, y, x = np.unravel_index(flat, shape)
    per_row = -(-shape[2] // size)
    per_slice = -(-shape[1] // size) * per_row
    block = z * per_slice + (y // size) * per_row + x // size
    return 2 * block + (y // tile + x // tile) % 2


def _to_volume(values: np.ndarray, flat_index: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    out = np.zeros(int(np.prod(shape)), dtype=np.float32)
    out[flat_index] = values
    return out.reshape(shape)


def _smooth_in_mask(hu: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
    """In-plane Gaussian smoothing of every frame inside ``mask``, normalised to it (nothing outside
    the mask bleeds in, and the mask edge keeps its level); voxels outside keep their values."""
    weight = np.maximum(ndimage.gaussian_filter(mask.astype(np.float32), (0, sigma, sigma)), 1e-6)
    out = hu.copy()
    for t in range(hu.shape[0]):
        smooth = ndimage.gaussian_filter(np.where(mask, hu[t], np.float32(0)), (0, sigma, sigma)) / weight
        out[t][mask] = smooth[mask]
    return out
