"""What the perfusion output writers draw on: plain arrays and small dataclasses, no analysis code.

``PerfusionAnalysis`` is one analysis of one series (the synthetic 1 s series, or the acquired one
alone, told apart by its ``AnalysisKind``): maps, lesion masks, volumes, the AIF and VOF.
``PerfusionOutputInput`` gathers the analyses of one job with the images the outputs refer to and the
guardrail's verdict. ``analysis_from_maps`` and ``output_input`` adapt the result of
``ctp_node.perfusion.compute_perfusion``; any other analysis can fill the dataclasses directly.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctp_node.errors import PerfusionOutputError
from ctp_node.perfusion import PerfusionMaps
from ctp_node.perfusion.reliability import NoiseRange
from ctp_node.series.guardrail import GuardrailVerdict

MAP_NAMES = ("cbf", "cbv", "mtt", "tmax")
MASK_NAMES = ("core", "tmax6", "tmax10")


class AnalysisKind(enum.Enum):
    """Which series an analysis was made from. Its value names the outputs made from it (folders,
    ``OutputSeries.analysis``, the series' UIDs); ``label`` is how their text names the series and
    ``short`` how their SeriesDescription does."""

    SYNTHETIC = "synthetic"
    ACQUIRED = "acquired"

    @property
    def label(self) -> str:
        return LABELS[self]

    @property
    def short(self) -> str:
        return SHORT[self]


LABELS = {AnalysisKind.SYNTHETIC: "synthetic 1 s", AnalysisKind.ACQUIRED: "acquired"}
SHORT = {AnalysisKind.SYNTHETIC: "SYN1s", AnalysisKind.ACQUIRED: "ACQ"}


@dataclass(frozen=True)
class PerfusionAnalysis:
    """One perfusion analysis on the grid of the reference images: (Z, Y, X) maps and masks.

    Units: CBF mL/100 g/min, CBV mL/100 g, MTT s, Tmax s. Volumes in mL (None: not known, e.g. without
    a voxel size). ``aif_voxels`` / ``vof_voxels``: (n, 3) int (z, y, x) of the voxels whose mean curves
    are ``aif_curve`` / ``vof_curve`` (HU above baseline at ``times_s``); VOF None when none was chosen.
    ``kind``: which series was analysed; ``label`` (from the kind): how the outputs' text names it.
    """

    kind: AnalysisKind
    cbf: np.ndarray
    cbv: np.ndarray
    mtt: np.ndarray
    tmax: np.ndarray
    core_mask: np.ndarray
    tmax6_mask: np.ndarray
    tmax10_mask: np.ndarray
    times_s: np.ndarray
    aif_curve: np.ndarray | None
    aif_voxels: np.ndarray | None
    vof_curve: np.ndarray | None = None
    vof_voxels: np.ndarray | None = None
    brain_mask: np.ndarray | None = None
    core_volume_ml: float | None = None
    tmax6_volume_ml: float | None = None
    tmax10_volume_ml: float | None = None
    mismatch_volume_ml: float | None = None
    mismatch_ratio: float | None = None
    hypoperfusion_intensity_ratio: float | None = None
    reference_cbf: float | None = None
    method: str = ""
    notes: tuple[str, ...] = ()
    # Volume name ("core", "tmax6", "tmax10") -> why the analysis withholds it (its ``*_volume_ml`` is
    # then None, and so is everything built on it); the SR, SEG and QA report say so instead of a number.
    withheld: Mapping[str, str] = field(default_factory=dict)
    # Map name -> (Z, Y, X) bool, True where the data support the value (``ctp_node.perfusion.validity``);
    # empty when the analysis did not say. The maps and the QA report state the invalid fraction.
    valid: Mapping[str, np.ndarray] = field(default_factory=dict)
    tissue_mask: np.ndarray | None = None  # the analysed tissue the invalid fractions refer to
    # Volume name -> how far the study's own noise moves it (``ctp_node.perfusion.uncertainty``): the SR gives
    # the range as the measurement's uncertainty; empty when not estimated.
    noise: Mapping[str, NoiseRange] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.kind.label

    def map(self, name: str) -> np.ndarray:
        return getattr(self, name)

    def mask(self, name: str) -> np.ndarray:
        return getattr(self, f"{name}_mask")

    def invalid_fraction(self, name: str) -> float | None:
        """Share of the analysed tissue (else the brain) where map ``name`` has no valid value; None: not assessed."""
        valid = self.valid.get(name)
        region = self.tissue_mask if self.tissue_mask is not None else self.brain_mask
        if valid is None or region is None or not np.any(region):
            return None
        region = np.asarray(region, dtype=bool)
        return float(np.count_nonzero(region & ~np.asarray(valid, dtype=bool))) / float(np.count_nonzero(region))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(np.shape(self.cbf))  # type: ignore[return-value]

    def check(self) -> None:
        """Shapes and types agree; PerfusionOutputError says what does not."""
        if not isinstance(self.kind, AnalysisKind):
            raise PerfusionOutputError(f"kind must be an AnalysisKind, got {self.kind!r}")
        shape = self.shape
        if len(shape) != 3:
            raise PerfusionOutputError(f"{self.label}: maps must be (Z, Y, X), got cbf of shape {shape}")
        for name in MAP_NAMES:
            if np.shape(self.map(name)) != shape:
                raise PerfusionOutputError(f"{self.label}: {name} has shape {np.shape(self.map(name))}, cbf {shape}")
        for name in MASK_NAMES:
            mask = np.asarray(self.mask(name))
            if mask.shape != shape or mask.dtype != bool:
                raise PerfusionOutputError(
                    f"{self.label}: {name}_mask must be a bool array of shape {shape}, got {mask.dtype} {mask.shape}"
                )
        if self.brain_mask is not None and np.shape(self.brain_mask) != shape:
            raise PerfusionOutputError(f"{self.label}: brain_mask has shape {np.shape(self.brain_mask)}, maps {shape}")
        for name in ("aif", "vof"):
            curve, voxels = getattr(self, f"{name}_curve"), getattr(self, f"{name}_voxels")
            if curve is not None and np.shape(curve) != np.shape(self.times_s):
                raise PerfusionOutputError(
                    f"{self.label}: {name}_curve has {np.shape(curve)} values for {np.shape(self.times_s)} times"
                )
            if voxels is not None and (np.ndim(voxels) != 2 or np.shape(voxels)[1] != 3):
                raise PerfusionOutputError(f"{self.label}: {name}_voxels must be (n, 3) (z, y, x)")


@dataclass(frozen=True)
class TissueCurves:
    """Mean time-attenuation curves (HU) of tissue classes of one series, at ``times_s``."""

    times_s: np.ndarray
    curves: Mapping[str, np.ndarray]


@dataclass(frozen=True)
class PerfusionOutputInput:
    """Everything one job's perfusion outputs are written from.

    ``reference_files``: one single-frame image per slice (z order) on the maps' grid, whose patient,
    study and geometry the outputs copy and which SEG and SR reference: the derived 1 s series' first
    second (``DerivedSeries.paths[:Z]``). ``source_series_uid``: the series the job received (part of
    every output UID, as for the derived series). ``anatomy_hu``: (Z, Y, X) unenhanced HU shown under the
    QA report's overlays (None: the CBV map is shown instead).
    """

    synthetic: PerfusionAnalysis
    reference_files: Sequence[Path]
    source_series_uid: str
    acquired: PerfusionAnalysis | None = None
    synthetic_curves: TissueCurves | None = None
    acquired_curves: TissueCurves | None = None
    anatomy_hu: np.ndarray | None = None
    guardrail: GuardrailVerdict | None = None
    generation: int = 1
    notes: tuple[str, ...] = field(default=())

    @property
    def analyses(self) -> list[PerfusionAnalysis]:
        return [a for a in (self.synthetic, self.acquired) if a is not None]


def mean_tissue_curves(hu: np.ndarray, times_s: np.ndarray, regions: Mapping[str, np.ndarray]) -> TissueCurves:
    """Mean curve of each non-empty region (Z, Y, X bool; a voxel counts for the first region holding it)
    of a (T, Z, Y, X) HU series.

    Per frame, the voxels of all regions are gathered once and summed per region by one ``bincount``:
    a 1 s series at 512 x 512 is never copied, and voxels outside every region are never read."""
    hu = np.asarray(hu)
    names = [name for name, mask in regions.items() if np.any(mask)]
    labels = np.zeros(hu.shape[1:], dtype=np.int32)
    for index, name in reversed(list(enumerate(names, start=1))):  # the first region wins a shared voxel
        labels[np.asarray(regions[name], dtype=bool)] = index
    flat = labels.reshape(-1)
    inside = np.flatnonzero(flat)
    region = flat[inside] - 1
    counts = np.bincount(region, minlength=len(names)).astype(np.float64)
    sums = np.stack([np.bincount(region, weights=frame.reshape(-1)[inside], minlength=len(names)) for frame in hu])
    curves = {name: sums[:, i] / counts[i] for i, name in enumerate(names)}
    return TissueCurves(np.asarray(times_s, dtype=np.float64), curves)


def tissue_regions(analysis: PerfusionAnalysis, tissue: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The QA report's tissue classes: normally perfused tissue, Tmax > 6 s outside the core, core."""
    base = tissue if tissue is not None else analysis.brain_mask
    if base is None:
        base = np.ones(analysis.shape, dtype=bool)
    return {
        "normal (Tmax <= 6 s)": base & ~analysis.tmax6_mask & ~analysis.core_mask,
        "Tmax > 6 s, not core": analysis.tmax6_mask & ~analysis.core_mask,
        "core (rCBF < 30 %)": analysis.core_mask,
    }


def analysis_from_maps(
    maps: PerfusionMaps, kind: AnalysisKind, voxel_volume_ml: float | None = None
) -> PerfusionAnalysis:
    """A ``PerfusionAnalysis`` from ``compute_perfusion``'s result.

    An analysis without a Tmax > 10 s mask (``severe_mask`` None: made by an older version) gets it
    rebuilt by the lesion module's rules (same thresholds and cleaning as the analysis uses)."""
    from ctp_node.perfusion import lesion

    voxel_ml = voxel_volume_ml if voxel_volume_ml is not None else maps.voxel_volume_ml
    tmax10 = maps.severe_mask
    if tmax10 is None:
        tmax10 = lesion.lesion_masks(maps.tissue_mask, maps.cbf, maps.tmax, voxel_volume_ml=voxel_ml).severe
    core, tmax6 = np.asarray(maps.core_mask, bool), np.asarray(maps.hypoperfusion_mask, bool)
    tmax10 = np.asarray(tmax10, bool)
    volumes = _volumes(core, tmax6, tmax10, voxel_ml)
    # The analysis' own volumes win where it reports them (its cleaning of isolated voxels included).
    for key, given in (
        ("core", maps.core_volume_ml),
        ("tmax6", maps.hypoperfusion_volume_ml),
        ("tmax10", maps.severe_hypoperfusion_volume_ml),
    ):
        if given is not None:
            volumes[key] = float(given)
    withheld = dict(getattr(maps, "withheld", {}) or {})
    for key in withheld:
        volumes[key] = None  # withheld by the analysis: never recomputed from the masks here
    mismatch = maps.mismatch_volume_ml
    if mismatch is None and volumes["core"] is not None and volumes["tmax6"] is not None:
        mismatch = volumes["tmax6"] - volumes["core"]  # as the analysis defines it: negative when core > Tmax > 6 s
    hir = _ratio(volumes["tmax10"], volumes["tmax6"])
    vof_curve, vof_voxels = _vof(maps)
    return PerfusionAnalysis(
        kind=kind,
        cbf=maps.cbf, cbv=maps.cbv, mtt=maps.mtt, tmax=maps.tmax,
        core_mask=core, tmax6_mask=tmax6, tmax10_mask=tmax10,
        times_s=np.asarray(maps.times_s, dtype=np.float64),
        aif_curve=np.asarray(maps.aif_curve), aif_voxels=np.asarray(maps.aif_voxels),
        vof_curve=vof_curve,
        vof_voxels=vof_voxels,
        brain_mask=maps.brain_mask,
        core_volume_ml=volumes["core"], tmax6_volume_ml=volumes["tmax6"], tmax10_volume_ml=volumes["tmax10"],
        mismatch_volume_ml=None if mismatch is None else float(mismatch),
        mismatch_ratio=_ratio(volumes["tmax6"], volumes["core"]),
        hypoperfusion_intensity_ratio=hir,
        reference_cbf=maps.reference_cbf,
        method=maps.method,
        notes=tuple(maps.notes),
        withheld=withheld,
        valid=maps.validity.masks() if getattr(maps, "validity", None) is not None else {},
        tissue_mask=getattr(maps, "tissue_mask", None),
        noise={
            name: check.noise for name, check in (getattr(maps, "volume_checks", {}) or {}).items()
            if check.noise is not None and name not in withheld
        },
    )  # fmt: skip


def output_input(
    synthetic_maps: PerfusionMaps,
    synthetic_hu: np.ndarray,
    reference_files: Sequence[Path],
    source_series_uid: str,
    *,
    voxel_volume_ml: float | None,
    acquired_maps: PerfusionMaps | None = None,
    acquired_hu: np.ndarray | None = None,
    guardrail: GuardrailVerdict | None = None,
    generation: int = 1,
    synthetic_times_s: np.ndarray | None = None,
    acquired_times_s: np.ndarray | None = None,
) -> PerfusionOutputInput:
    """The writers' input from ``compute_perfusion`` results of the synthetic (and acquired) series.

    ``synthetic_hu`` / ``acquired_hu``: the (T, Z, Y, X) HU series the maps were computed from (mean tissue
    curves, anatomy), acquired at ``synthetic_times_s`` / ``acquired_times_s`` (default: the maps' times,
    which differ when the analysis dropped interpolated frames); the tissue classes of both come from
    the synthetic analysis, so the curves compare the same voxels."""
    synthetic = analysis_from_maps(synthetic_maps, AnalysisKind.SYNTHETIC, voxel_volume_ml)
    acquired = None
    if acquired_maps is not None:
        acquired = analysis_from_maps(acquired_maps, AnalysisKind.ACQUIRED, voxel_volume_ml)
    regions = tissue_regions(synthetic, synthetic_maps.tissue_mask)
    # The analysis may have dropped frames (linear interpolations of their neighbours: the guardrail's
    # fallback, a long gap): its times are then a subset of the series', and curves and the baseline
    # are taken from the series on its own clock.
    syn_times = np.asarray(synthetic.times_s if synthetic_times_s is None else synthetic_times_s, dtype=np.float64)
    synthetic_curves = mean_tissue_curves(synthetic_hu, syn_times, regions)
    acquired_curves = None
    if acquired_hu is not None and acquired_maps is not None:
        acq_times = acquired_maps.times_s if acquired_times_s is None else acquired_times_s
        acquired_curves = mean_tissue_curves(acquired_hu, np.asarray(acq_times, dtype=np.float64), regions)
    baseline = synthetic_maps.baseline_frames
    frames = np.asarray(baseline if baseline is not None and len(baseline) else [0], dtype=int)
    at = np.asarray(synthetic_maps.times_s, dtype=np.float64)[frames]
    frames = np.clip(np.searchsorted(syn_times, at - 1e-6), 0, len(syn_times) - 1)
    anatomy = np.mean([np.asarray(synthetic_hu[int(i)], dtype=np.float32) for i in frames], axis=0)
    return PerfusionOutputInput(
        synthetic=synthetic, reference_files=list(reference_files), source_series_uid=source_series_uid,
        acquired=acquired, synthetic_curves=synthetic_curves, acquired_curves=acquired_curves,
        anatomy_hu=anatomy, guardrail=guardrail, generation=generation,
    )  # fmt: skip


def _vof(maps: PerfusionMaps) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The VOF's curve and voxels when the analysis chose one on its own times; else (None, None)."""
    vessel = maps.aif_selection.vof if maps.aif_selection is not None else None
    if vessel is None or len(vessel.voxels) == 0 or np.shape(vessel.curve) != np.shape(maps.times_s):
        return None, None  # the QA report says "no VOF"
    return np.asarray(vessel.curve, dtype=np.float64), np.asarray(vessel.voxels)


def _volumes(core, tmax6, tmax10, voxel_ml: float | None) -> dict[str, float | None]:
    if voxel_ml is None:
        return {"core": None, "tmax6": None, "tmax10": None}
    return {name: float(mask.sum()) * voxel_ml for name, mask in (("core", core), ("tmax6", tmax6), ("tmax10", tmax10))}


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    """None when either is unknown or the denominator is 0 (no lesion: the ratio is undefined, not 0)."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return float(numerator) / float(denominator)
