"""Phantom family B: an independent CT perfusion phantom for held-out tests of analysis and inpainting.

Nothing here is shared with the default phantom (``generator``) except the label codes
(``TissueLabel``) and the result types (``PhantomStudy``, ``PerfusionTruth``), so that every consumer
of a phantom study takes a family-B study unchanged. What differs, on purpose:

- Anatomy: a superquadric head whose axes shrink towards the vertex; a folded cortical ribbon with
  CSF-filled sulci following the brain surface, a subarachnoid layer, an interhemispheric fissure,
  deep grey nuclei and lateral ventricles as ellipses; through-plane arteries and veins drawn with
  partial volume at their edges (so vessel voxels have every peak height between tissue and artery).
- Grid: 256 x 256 at 0.9 mm, 8 slices of 5 mm, 60 s at 1 s by default.
- AIF: a gamma variate of other shape and timing per study (onset 5-9 s, peak 350-550 HU) plus a
  delayed, dispersed recirculation; venous output (superior sagittal and straight sinuses): the AIF
  delayed and dispersed with its area kept.
- Residue: transit times gamma distributed (the capillary transit-time heterogeneity model),
  ``R(t) = 1 - GammaCDF(t; a, MTT / a)`` with the shape ``a`` drawn per study (1.5-3): neither the
  exponential nor the box residue of the default family.
- Lesion: a territory-shaped sector of one hemisphere (side, angle, extent drawn per study) whose
  penumbra (CBF 55-75 % of normal, CBV kept, delay 2.5-9 s) surrounds an irregular core blob (CBF
  12-20 % of normal, CBV 40-60 %) delayed 0-2 s more than the penumbra and at least
  ``CORE_MIN_DELAY_S`` where its membership is one half, so that the core lies inside the Tmax > 6 s
  region as in patients (a core with a short Tmax is a contradiction a reader would see; the
  ``*_override`` fields can still build one); parameters blend smoothly over ~2 mm at the borders.
- Noise: 6 HU per voxel with a CT-like texture (noise power spectrum ``f exp(-(f / f0)^2)``,
  peaking at 0.25 cycles/mm, as filtered back-projection gives), slightly stronger in the centre.

Truth: ``study.truth`` holds the parameters used to build each voxel's curve (CBF, CBV, MTT, Tmax =
delay, since R is largest at its start). ``truth_volumes`` applies the analysis's own conventions to
the true maps: the volumes a perfect analysis would report. Call it as::

    from ctp_node.phantom.family_b import FamilyBConfig, generate_family_b
    study = generate_family_b(FamilyBConfig(seed=3))      # PhantomStudy; study.truth: PerfusionTruth
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import special

from ctp_node.phantom.generator import PerfusionTruth, PhantomStudy
from ctp_node.phantom.tissue import CORE_LABELS, INTRACRANIAL_LABELS, PENUMBRA_LABELS, TissueLabel

K_HAEMATOCRIT_DENSITY = (1 - 0.45) / (1 - 0.25) / 1.05  # the analysis's k: CBF = k * max(F R) * 6000
FINE_S = 0.05  # convolution step of the curve table
QUANTUM_S = 0.1  # per-voxel MTT and delay are rounded to this (the rounded values are the truth)
BASELINE_HU = {
    TissueLabel.AIR: -1000.0,
    TissueLabel.SOFT_TISSUE: 30.0,
    TissueLabel.BONE: 1100.0,
    TissueLabel.CSF: 7.0,
    TissueLabel.GREY_MATTER: 37.0,
    TissueLabel.WHITE_MATTER: 28.0,
    TissueLabel.ARTERY: 42.0,
    TissueLabel.VEIN: 42.0,
}
NPS_F0_PER_MM = 0.35  # texture of the noise: NPS f exp(-(f/f0)^2) peaks at f0 / sqrt(2)
# The drawn core's delay where its membership is 0.5; the true core (rCBF < 30 %) needs a membership
# of about 0.6-0.8, so every true core voxel is delayed beyond the 6 s threshold with a margin.
CORE_MIN_DELAY_S = 6.5


@dataclass(frozen=True)
class FamilyBConfig:
    """One family-B study. Lesion geometry, delays, perfusion and AIF are drawn from ``seed``; the
    ``*_override`` fields pin one of them (None: drawn)."""

    seed: int = 0
    matrix: int = 256
    pixel_mm: float = 0.9
    slices: int = 8
    slice_thickness_mm: float = 5.0
    duration_s: int = 60
    noise_hu: float = 6.0
    lesion: bool = True
    penumbra_delay_override_s: float | None = None
    core_radius_override_mm: float | None = None
    core_extra_delay_override_s: float | None = None  # the core's delay beyond the penumbra's (drawn, see _draw)
    side_override: int | None = None  # +1: patient left (+x), -1: right
    core_cbf_ratio_override: float | None = None  # the core's CBF / normal tissue's (drawn 0.12-0.2)

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.matrix, int) or self.matrix < 64:
            problems.append(f"matrix must be an integer >= 64, got {self.matrix!r}")
        if not isinstance(self.slices, int) or self.slices < 1:
            problems.append(f"slices must be a positive integer, got {self.slices!r}")
        if not isinstance(self.duration_s, int) or self.duration_s < 30:
            problems.append(f"duration_s must be an integer >= 30 (the bolus must pass), got {self.duration_s!r}")
        if not (self.pixel_mm > 0 and self.slice_thickness_mm > 0 and self.noise_hu >= 0):
            problems.append("pixel_mm and slice_thickness_mm must be > 0 and noise_hu >= 0")
        if self.matrix * self.pixel_mm < 180:
            problems.append(f"the field of view {self.matrix * self.pixel_mm:g} mm does not hold the 175 mm head")
        if self.core_cbf_ratio_override is not None and not 0 < self.core_cbf_ratio_override < 1:
            problems.append(f"core_cbf_ratio_override {self.core_cbf_ratio_override} is not in (0, 1)")
        if self.side_override not in (None, 1, -1):
            problems.append(f"side_override must be 1, -1 or None, got {self.side_override!r}")
        if problems:
            raise ValueError("invalid FamilyBConfig: " + "; ".join(problems))

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        return (self.slice_thickness_mm, self.pixel_mm, self.pixel_mm)


@dataclass(frozen=True)
class _Draw:
    """Everything random about one study."""

    aif_onset_s: float
    aif_alpha: float
    aif_beta: float
    aif_peak_hu: float
    recirculation_delay_s: float
    residue_shape: float
    gm: tuple[float, float]  # (CBF, MTT)
    wm: tuple[float, float]
    deep: tuple[float, float]
    normal_delay_s: float
    side: int
    sector_angle: float  # rad, direction of the territory from the lateral axis
    sector_half_width: float  # rad
    lesion_z_mm: float
    lesion_half_height_mm: float
    penumbra_cbf_ratio: float
    penumbra_delay_s: float
    core_cbf_ratio: float
    core_cbv_ratio: float
    core_radius_mm: float
    core_extra_delay_s: float
    gyri: int
    fold_phase: float


def _draw(cfg: FamilyBConfig) -> _Draw:
    rng = np.random.default_rng([cfg.seed, 0xB])
    u = rng.uniform
    drawn = _Draw(
        aif_onset_s=u(5.0, 9.0), aif_alpha=u(2.5, 4.0), aif_beta=u(1.1, 1.6), aif_peak_hu=u(350.0, 550.0),
        recirculation_delay_s=u(9.0, 13.0), residue_shape=u(1.5, 3.0),
        gm=(u(48.0, 62.0), u(3.4, 4.2)), wm=(u(20.0, 26.0), u(4.3, 5.2)), deep=(u(42.0, 52.0), u(3.6, 4.4)),
        normal_delay_s=u(0.2, 1.0),
        side=cfg.side_override or int(rng.choice([-1, 1])),
        sector_angle=u(-0.5, 0.5), sector_half_width=u(0.45, 0.8),
        lesion_z_mm=u(-8.0, 8.0), lesion_half_height_mm=u(14.0, 26.0),
        penumbra_cbf_ratio=u(0.55, 0.75),
        penumbra_delay_s=cfg.penumbra_delay_override_s if cfg.penumbra_delay_override_s is not None else u(2.5, 9.0),
        core_cbf_ratio=_pinned(cfg.core_cbf_ratio_override, u(0.12, 0.2)), core_cbv_ratio=u(0.4, 0.6),
        core_radius_mm=cfg.core_radius_override_mm if cfg.core_radius_override_mm is not None else u(10.0, 22.0),
        core_extra_delay_s=_pinned(cfg.core_extra_delay_override_s, u(0.0, 2.0)),
        gyri=int(rng.integers(18, 28)), fold_phase=u(0.0, 2 * np.pi),
    )  # fmt: skip
    return _core_beyond_threshold(drawn, cfg)


def _core_beyond_threshold(d: _Draw, cfg: FamilyBConfig) -> _Draw:
    """The drawn core's extra delay raised so that the core's half-membership rim is delayed at least
    ``CORE_MIN_DELAY_S`` (lesion delay there: penumbra + extra / 2); an override is kept as given."""
    if cfg.core_extra_delay_override_s is not None:
        return d
    needed = 2.0 * (CORE_MIN_DELAY_S - d.penumbra_delay_s)
    return replace(d, core_extra_delay_s=max(d.core_extra_delay_s, needed))


def _pinned(override: float | None, drawn: float) -> float:
    """The override when given; the value is drawn either way, so the other draws stay the same."""
    return drawn if override is None else override


def aif_curve(t: np.ndarray, d: _Draw) -> np.ndarray:
    """HU above baseline: gamma-variate first pass plus a delayed, dispersed 30 % recirculation."""
    s = np.clip(np.asarray(t, dtype=np.float64) - d.aif_onset_s, 0.0, None)
    first = (s / (d.aif_alpha * d.aif_beta)) ** d.aif_alpha * np.exp(d.aif_alpha - s / d.aif_beta)
    recirculation = 0.3 * _dispersed(_shifted(first, t, d.recirculation_delay_s), t, 5.0)
    return d.aif_peak_hu * (first + recirculation)


def _shifted(curve: np.ndarray, t: np.ndarray, delay_s: float) -> np.ndarray:
    return np.interp(t - delay_s, t, curve, left=0.0)


def _dispersed(curve: np.ndarray, t: np.ndarray, tau_s: float) -> np.ndarray:
    """Convolution with a unit-area exponential of mean ``tau_s``: the area is kept."""
    step = float(t[1] - t[0])
    kernel = np.exp(-np.arange(t.size) * step / tau_s)
    kernel /= kernel.sum()
    return np.convolve(curve, kernel)[: t.size]


def residue(t: np.ndarray, mtt_s: float, shape: float) -> np.ndarray:
    """``1 - GammaCDF(t; shape, MTT / shape)``: R(0) = 1, integral MTT, largest at t = 0."""
    return special.gammaincc(shape, np.clip(t, 0.0, None) * shape / mtt_s)


def generate_family_b(cfg: FamilyBConfig | None = None) -> PhantomStudy:
    """Simulate one family-B study (deterministic for a given configuration)."""
    cfg = cfg or FamilyBConfig()
    d = _draw(cfg)
    x, y, z = _coords(cfg)
    labels, rho = _anatomy(x, y, z, d)
    vessel_fraction, vessel_kind = _vessels(x, y, z, rho, d, cfg.pixel_mm)
    # Voxels touched by a vessel carry its curve only (their tissue share is not part of the truth).
    inside = labels != TissueLabel.BONE
    labels[inside & np.isin(vessel_kind, (1, 2)) & (vessel_fraction > 0.1)] = TissueLabel.ARTERY
    labels[inside & (vessel_kind == 3) & (vessel_fraction > 0.1)] = TissueLabel.VEIN
    vessel_fraction[~np.isin(labels, (TissueLabel.ARTERY, TissueLabel.VEIN))] = 0.0
    params = _perfusion(labels, x, y, z, rho, d, cfg)

    times = np.arange(cfg.duration_s, dtype=np.float64)
    fine = np.arange(0.0, times[-1] + FINE_S / 2, FINE_S)
    aif_fine = aif_curve(fine, d)
    vof_fine = _dispersed(_shifted(aif_fine, fine, 5.0), fine, 3.0)
    sample = np.rint(times / FINE_S).astype(np.int64)

    baseline = _baseline(labels, x, y, z, rho, cfg.seed)
    tissue = np.flatnonzero(params["cbf"] > 0)
    mtt_q = np.rint(params["mtt"].reshape(-1)[tissue] / QUANTUM_S).astype(np.int64)
    delay_q = np.rint(params["delay"].reshape(-1)[tissue] / QUANTUM_S).astype(np.int64)
    key, inverse = np.unique(mtt_q * 10_000 + delay_q, return_inverse=True)
    table = _curve_table(aif_fine, fine, sample, key // 10_000 * QUANTUM_S, key % 10_000 * QUANTUM_S, d.residue_shape)
    flow = (params["cbf"].reshape(-1)[tissue] / 6000.0 / K_HAEMATOCRIT_DENSITY).astype(np.float32)

    rng_noise = np.random.default_rng([cfg.seed, 0xB, 1])
    noise_profile = (1.0 + 0.15 * np.clip(1.0 - rho**2, 0.0, 1.0)).astype(np.float32)
    shape = labels.shape
    hu = np.empty((times.size, *shape), dtype=np.float32)
    flat_fraction = vessel_fraction.reshape(-1)
    artery = np.flatnonzero(vessel_kind.reshape(-1) == 1)
    late_artery = np.flatnonzero(vessel_kind.reshape(-1) == 2)
    vein = np.flatnonzero(vessel_kind.reshape(-1) == 3)
    collateral_fine = _dispersed(_shifted(aif_fine, fine, max(d.penumbra_delay_s, 2.0)), fine, 2.0)
    for i, s in enumerate(sample):
        frame = baseline.copy().reshape(-1)
        frame[tissue] += flow * table[inverse, i]
        frame[artery] += flat_fraction[artery] * np.float32(aif_fine[s])
        frame[late_artery] += flat_fraction[late_artery] * np.float32(collateral_fine[s])
        frame[vein] += flat_fraction[vein] * np.float32(vof_fine[s])
        hu[i] = frame.reshape(shape)
        if cfg.noise_hu > 0:
            hu[i] += ct_noise(rng_noise, shape, cfg.noise_hu, cfg.pixel_mm) * noise_profile
    truth = _truth(labels, params, d)
    half = (cfg.matrix - 1) * cfg.pixel_mm / 2
    origin = (-half, -half, float(z[0, 0, 0]))
    return PhantomStudy(hu, times, cfg.spacing_mm, origin, aif_fine[sample], truth, cfg)  # type: ignore[arg-type]


def ct_noise(rng: np.random.Generator, shape: tuple[int, ...], std_hu: float, pixel_mm: float) -> np.ndarray:
    """float32 (..., Y, X) noise with per-voxel std ``std_hu`` and an FBP-like in-plane power spectrum."""
    white = rng.standard_normal(shape, dtype=np.float32)
    fy = np.fft.fftfreq(shape[-2], d=pixel_mm)[:, None]
    fx = np.fft.rfftfreq(shape[-1], d=pixel_mm)[None, :]
    f = np.hypot(fy, fx)
    amplitude = np.sqrt(f * np.exp(-((f / NPS_F0_PER_MM) ** 2)))
    coloured = np.fft.irfft2(np.fft.rfft2(white) * amplitude, s=shape[-2:]).astype(np.float32)
    coloured *= np.float32(std_hu / max(float(coloured.std()), 1e-12))
    return coloured


def _coords(cfg: FamilyBConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, z) mm broadcastable to (Z, Y, X): +x patient left, +y posterior, slab centred at z = 0."""
    axis = (np.arange(cfg.matrix) - (cfg.matrix - 1) / 2) * cfg.pixel_mm
    zs = (np.arange(cfg.slices) - (cfg.slices - 1) / 2) * cfg.slice_thickness_mm
    return axis[None, None, :], axis[None, :, None], zs[:, None, None]


def _anatomy(x, y, z, d: _Draw) -> tuple[np.ndarray, np.ndarray]:
    """Labels (Z, Y, X) uint8 and the normalised superquadric radius rho (1 at the inner skull)."""
    scale = np.sqrt(np.clip(1.0 - ((z + 15.0) / 95.0) ** 2, 0.2, 1.0))
    a, b, p = 68.0 * scale, 84.0 * scale, 2.4
    rho = (np.abs(x / a) ** p + np.abs(y / b) ** p) ** (1.0 / p)
    mean_axis = 76.0 * scale
    depth = (1.0 - rho) * mean_axis  # mm inside the inner skull, approximately
    theta = np.arctan2(y, x)
    labels = np.full(np.broadcast_shapes(x.shape, y.shape, z.shape), TissueLabel.AIR, dtype=np.uint8)
    labels[depth > -13.0] = TissueLabel.SOFT_TISSUE
    labels[depth > -7.0] = TissueLabel.BONE
    labels[depth > 0.0] = TissueLabel.CSF
    fold = 0.5 * (1.0 + np.cos(d.gyri * theta + d.fold_phase + 0.08 * z))
    surface = 2.0 + 0.8 * np.cos(7 * theta + 0.05 * z)  # subarachnoid layer, 1.2-2.8 mm
    ribbon = 3.5 + 5.0 * fold  # cortical thickness incl. the gyral crown
    brain = depth > surface
    labels[brain] = TissueLabel.WHITE_MATTER
    labels[brain & (depth < surface + ribbon)] = TissueLabel.GREY_MATTER
    sulcus = brain & (depth < surface + ribbon - 1.0) & (np.cos(d.gyri * theta + d.fold_phase + 0.08 * z) < -0.93)
    labels[sulcus] = TissueLabel.CSF
    for sx in (-1.0, 1.0):
        deep = ((x - sx * 19.0) / 9.0) ** 2 + ((y - 4.0) / 15.0) ** 2 + (z / 22.0) ** 2 < 1.0
        labels[deep & brain] = TissueLabel.GREY_MATTER
        ventricle = (
            ((x - sx * 7.0) / 4.5) ** 2 + ((y - 2.0 - 0.15 * (x - sx * 7.0)) / 19.0) ** 2 + ((z - 8.0) / 20.0) ** 2
        )
        labels[(ventricle < 1.0) & brain] = TissueLabel.CSF
    fissure = (np.abs(x) < 1.3) & (np.abs(y - 2.0) > 24.0) & brain
    labels[fissure] = TissueLabel.CSF
    return labels, np.broadcast_to(rho, labels.shape).copy()


def _vessels(x, y, z, rho, d: _Draw, pixel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Partial-volume fraction (Z, Y, X) of through-plane vessels and their kind (1 artery, 2 artery
    beyond the occlusion, 3 vein; 0 none)."""
    shape = rho.shape
    fraction = np.zeros(shape, dtype=np.float32)
    kind = np.zeros(shape, dtype=np.uint8)
    scale = np.sqrt(np.clip(1.0 - ((z + 15.0) / 95.0) ** 2, 0.2, 1.0))
    spots = []
    for sx in (-1.0, 1.0):
        late = 2 if sx == d.side else 1
        spots += [
            ((sx * 14.0, -16.0), 2.4, 1, z < 12.0),  # internal carotid / M1 origin
            ((sx * 38.0, -9.0), 1.4, late, z < 8.0),  # MCA branches in the Sylvian fissure
            ((sx * 45.0, 4.0), 1.1, late, z > -12.0),
            ((sx * 2.8, -32.0), 1.2, 1, np.ones_like(z, bool)),  # anterior cerebral
            ((sx * 21.0, 33.0), 1.2, 1, z < 6.0),  # posterior cerebral
        ]
    spots.append(((0.0, None), 4.0, 3, np.ones_like(z, bool)))  # superior sagittal sinus
    spots.append(((0.0, 48.0), 2.6, 3, z > -2.0))  # straight sinus
    for (cx, cy), radius, vessel, present in spots:
        centre_y = 84.0 * scale - 5.5 if cy is None else cy
        r = np.hypot(x - cx, y - centre_y)
        f = np.clip((radius - r) / pixel_mm + 0.5, 0.0, 1.0) * present
        f = np.broadcast_to(f, shape)
        take = f > fraction
        fraction[take] = f[take]
        kind[take] = vessel
    return fraction, kind


def _perfusion(labels, x, y, z, rho, d: _Draw, cfg: FamilyBConfig) -> dict[str, np.ndarray]:
    """Per-voxel CBF, CBV, MTT, delay (Z, Y, X) and the lesion's penumbra/core memberships (0..1)."""
    shape = labels.shape
    rng = np.random.default_rng([cfg.seed, 0xB, 2])
    field_cbf, field_mtt, field_delay = (_smooth_field(rng, x, y, z, 18.0) for _ in range(3))
    cbf = np.zeros(shape)
    mtt = np.zeros(shape)
    gm, wm = labels == TissueLabel.GREY_MATTER, labels == TissueLabel.WHITE_MATTER
    deep = gm & (np.abs(np.broadcast_to(x, shape)) < 30) & (np.abs(np.broadcast_to(y - 4.0, shape)) < 16)
    for region, (f, m) in ((gm, d.gm), (wm, d.wm), (deep, d.deep)):
        cbf[region], mtt[region] = f, m
    tissue = gm | wm
    cbf *= 1.0 + 0.08 * field_cbf
    mtt *= 1.0 + 0.08 * field_mtt
    delay = np.clip(d.normal_delay_s + 0.25 * field_delay, 0.0, None)
    penumbra = np.zeros(shape)
    core = np.zeros(shape)
    if cfg.lesion:
        penumbra, core = _lesion(x, y, z, rho, d, rng)
    cbv = cbf * mtt / 60.0
    pen_cbf = cbf * d.penumbra_cbf_ratio
    pen_cbv = cbv * 1.05
    core_cbf = cbf * d.core_cbf_ratio
    core_cbv = cbv * d.core_cbv_ratio
    lesion_cbf = (1 - penumbra) * cbf + penumbra * ((1 - core) * pen_cbf + core * core_cbf)
    lesion_cbv = (1 - penumbra) * cbv + penumbra * ((1 - core) * pen_cbv + core * core_cbv)
    lesion_delay = (1 - penumbra) * delay + penumbra * (d.penumbra_delay_s + core * d.core_extra_delay_s)
    out_mtt = np.where(tissue, np.rint(lesion_cbv / np.maximum(lesion_cbf, 1e-9) * 60.0 / QUANTUM_S) * QUANTUM_S, 0)
    out_delay = np.where(tissue, np.rint(lesion_delay / QUANTUM_S) * QUANTUM_S, 0.0)
    out_cbf = np.where(tissue, lesion_cbf, 0.0)
    return {
        "cbf": out_cbf, "cbv": out_cbf * out_mtt / 60.0, "mtt": out_mtt, "delay": out_delay,
        "penumbra": penumbra * tissue, "core": core * penumbra * tissue,
    }  # fmt: skip


def _lesion(x, y, z, rho, d: _Draw, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Smooth memberships: a territory sector of one hemisphere (penumbra) and an irregular core blob."""
    # Angle from the lateral axis of the lesion's side, so the sector opens towards the convexity.
    angle = np.arctan2(y, d.side * x)
    width_mm = 2.0
    radius_mm = rho * 70.0
    across = (d.sector_half_width - np.abs(angle - d.sector_angle)) * np.maximum(radius_mm, 10.0)
    inner = radius_mm - 0.3 * 70.0
    height = d.lesion_half_height_mm - np.abs(z - d.lesion_z_mm)
    edge = np.minimum(np.minimum(across, inner), height)
    penumbra = special.expit(edge / (width_mm / 2))
    cx = d.side * 0.68 * 70.0 * np.cos(d.sector_angle)
    cy = 0.68 * 80.0 * np.sin(d.sector_angle)
    bumps = _smooth_field(rng, x, y, z, 10.0)
    r = np.sqrt((x - cx) ** 2 + (y - cy) ** 2 + ((z - d.lesion_z_mm) * 0.9) ** 2)
    core = special.expit((d.core_radius_mm * (1.0 + 0.15 * bumps) - r) / (width_mm / 2))
    return np.broadcast_to(penumbra, rho.shape), np.broadcast_to(core, rho.shape)


def _smooth_field(rng: np.random.Generator, x, y, z, correlation_mm: float, n: int = 10) -> np.ndarray:
    """Zero-mean, unit-variance random cosine field (decorrelates over ``correlation_mm``)."""
    k = rng.normal(0.0, 1.0 / correlation_mm, (n, 3))
    phase = rng.uniform(0, 2 * np.pi, n)
    out = sum(np.cos(k[i, 0] * x + k[i, 1] * y + k[i, 2] * z + phase[i]) for i in range(n))
    return np.clip(out * math.sqrt(2.0 / n), -2.5, 2.5)


def _baseline(labels, x, y, z, rho, seed: int) -> np.ndarray:
    by_label = np.zeros(256, dtype=np.float32)
    for label, value in BASELINE_HU.items():
        by_label[label] = value
    base = by_label[labels]
    rng = np.random.default_rng([seed, 0xB, 3])
    soft = (labels != TissueLabel.AIR) & (labels != TissueLabel.BONE)
    drift = 2.0 * _smooth_field(rng, x, y, z, 25.0) + 3.0 * np.exp(-np.clip(1.0 - rho, 0, None) * 76.0 / 6.0)
    base[soft] += np.broadcast_to(drift, labels.shape)[soft].astype(np.float32)  # smooth variation + cupping
    return base


def _curve_table(aif_fine, fine, sample, mtts, delays, shape: float) -> np.ndarray:
    """(n_combos, T) ``(AIF conv R_delay)`` at the sample indices, HU s per unit flow (1/s)."""
    n = fine.size
    size = 1 << int(np.ceil(np.log2(2 * n)))
    aif_spec = np.fft.rfft(aif_fine, size)
    unique_mtt, mtt_index = np.unique(mtts, return_inverse=True)
    kernels = np.stack([residue(fine, float(m), shape) for m in unique_mtt])
    kernels[:, 0] *= 0.5  # trapezoid rule
    conv = np.fft.irfft(aif_spec[None] * np.fft.rfft(kernels, size, axis=1), size, axis=1)[:, :n] * FINE_S
    index = sample[None, :] - np.rint(np.asarray(delays) / FINE_S).astype(np.int64)[:, None]
    values = conv[mtt_index[:, None], np.clip(index, 0, n - 1)]
    return np.where(index >= 0, values, 0.0).astype(np.float32)


def _truth(labels: np.ndarray, params: dict[str, np.ndarray], d: _Draw) -> PerfusionTruth:
    pen, core = params["penumbra"], params["core"]
    tissue = params["cbf"] > 0
    gm_like = labels == TissueLabel.GREY_MATTER
    truth_labels = labels.copy()
    in_pen = tissue & (pen > 0.5) & (core <= 0.5)
    in_core = tissue & (core > 0.5)
    truth_labels[in_pen & gm_like] = TissueLabel.GM_PENUMBRA
    truth_labels[in_pen & ~gm_like] = TissueLabel.WM_PENUMBRA
    truth_labels[in_core & gm_like] = TissueLabel.GM_CORE
    truth_labels[in_core & ~gm_like] = TissueLabel.WM_CORE
    f32 = {name: params[name].astype(np.float32) for name in ("cbf", "cbv", "mtt", "delay")}
    return PerfusionTruth(
        cbf=f32["cbf"], cbv=f32["cbv"], mtt=f32["mtt"], tmax=f32["delay"].copy(), delay=f32["delay"],
        labels=truth_labels, core_mask=np.isin(truth_labels, CORE_LABELS),
        penumbra_mask=np.isin(truth_labels, PENUMBRA_LABELS),
        brain_mask=np.isin(truth_labels, INTRACRANIAL_LABELS) | (labels == TissueLabel.ARTERY),
    )  # fmt: skip


def truth_volumes(study: PhantomStudy) -> dict[str, float]:
    """Core (rCBF < 30 %) and Tmax > 6 s / > 10 s volumes (mL) of the conventions on the true maps."""
    from ctp_node.perfusion.lesion import convention_masks

    truth = study.truth
    voxel_ml = float(np.prod(study.spacing_mm)) / 1000.0
    masks = convention_masks(truth.cbf, truth.tmax, truth.parenchyma_mask, voxel_ml)
    return {
        "core_ml": float(masks.core.sum()) * voxel_ml,
        "tmax6_ml": float(masks.hypoperfusion.sum()) * voxel_ml,
        "tmax10_ml": float(masks.severe.sum()) * voxel_ml,
        "reference_cbf": masks.reference_cbf,
    }
