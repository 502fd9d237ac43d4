"""`generate_phantom`: a 1 s CT perfusion study of the analytic head, with its ground truth.

Stages (each a small function): grid -> labels (anatomy) -> per-voxel parameters (class values
times smooth random fields, quantised) -> a table of tissue curves, one per distinct (MTT, delay)
-> per time point: baseline + CBF-scaled tissue curves + vessel curves (+ motion, + noise).
The truth maps are the parameters actually used to build the curves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctp_node.phantom.aif import delayed_dispersed, reference_aif
from ctp_node.phantom.anatomy import (
    COLLATERAL_ARTERY,
    DISTAL_ARTERY,
    PROXIMAL_ARTERY,
    SINUS,
    Grid,
    Lesion,
    head_labels,
)
from ctp_node.phantom.config import PhantomConfig
from ctp_node.phantom.fields import SmoothField
from ctp_node.phantom.motion import RigidMotion, SliceMotion, draw_motions, moved_grid
from ctp_node.phantom.noise import correlated_noise
from ctp_node.phantom.residue import FINE_STEP_S, PARAMETER_STEP_S, curve_table
from ctp_node.phantom.tissue import (
    BASELINE_HU,
    CORE_LABELS,
    INTRACRANIAL_LABELS,
    K_HAEMATOCRIT_DENSITY,
    PENUMBRA_LABELS,
    PERFUSION,
    TissueLabel,
)

VESSEL_KINDS = (PROXIMAL_ARTERY, DISTAL_ARTERY, SINUS, COLLATERAL_ARTERY)
HU_FLOOR = -1024.0  # scanners clip reconstructed values here (stored value 0 with intercept -1024)
FIELD_CORRELATION_MM = 15.0
DISTAL_ARTERY_DELAY_S, DISTAL_ARTERY_DISPERSION_S = 0.5, 1.0
SINUS_DELAY_S, SINUS_DISPERSION_S = 6.0, 3.0
COLLATERAL_DELAY_S, COLLATERAL_DISPERSION_S = 4.0, 3.0  # like the penumbra's bolus delay


@dataclass
class PerfusionTruth:
    """Ground truth on the study grid, float32 (Z, Y, X) unless stated.

    Maps are defined in parenchyma (grey/white matter, penumbra, core) and 0 elsewhere.
    cbf mL/100 g/min; cbv mL/100 g (= cbf * mtt / 60, the integral of the residue used);
    mtt s; tmax s (time of the maximum of the delayed residue = delay); delay s (bolus delay
    relative to the AIF). labels: uint8 ``TissueLabel``. core_mask / penumbra_mask: the lesion's
    core and penumbra classes (not thresholds of the maps). brain_mask: everything inside the skull
    (parenchyma, CSF, vessels): the skull-stripped head.
    """

    cbf: np.ndarray
    cbv: np.ndarray
    mtt: np.ndarray
    tmax: np.ndarray
    delay: np.ndarray
    labels: np.ndarray
    core_mask: np.ndarray
    penumbra_mask: np.ndarray
    brain_mask: np.ndarray

    @property
    def parenchyma_mask(self) -> np.ndarray:
        """Voxels with perfusion truth (grey/white matter, penumbra, core)."""
        return np.isin(self.labels, list(PERFUSION))


@dataclass
class PhantomStudy:
    """A simulated 1 s CTP study: ``hu`` float32 (T, Z, Y, X) at ``times_s`` = 0, 1, ... s.

    ``spacing_mm`` is (z, y, x); ``origin_mm`` the patient position (x, y, z) of voxel (0, 0, 0), axes
    along +x (columns), +y (rows) and +z (slices, inferior to superior). ``aif_hu`` is the
    enhancement above baseline of the arterial input (internal carotid / M1 voxels).
    ``motion`` lists the rigid poses of moved volumes; truth refers to the unmoved head.
    """

    hu: np.ndarray
    times_s: np.ndarray
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    aif_hu: np.ndarray
    truth: PerfusionTruth
    config: PhantomConfig
    motion: tuple[RigidMotion, ...] = ()


@dataclass
class _Fields:
    cbf: SmoothField
    mtt: SmoothField
    delay: SmoothField
    baseline: SmoothField


@dataclass
class _Scene:
    """The head on one grid (reference or moved): everything needed to render any time point."""

    labels: np.ndarray
    vessels: dict[int, np.ndarray]  # vessel kind -> flat indices of its voxels
    baseline_hu: np.ndarray  # float32 (Z, Y, X)
    parenchyma: np.ndarray  # flat indices of perfused voxels
    flow_scale: np.ndarray  # float32 per perfused voxel: CBF / 6000 / k (1/s)
    mtt_steps: np.ndarray  # int per perfused voxel, MTT in PARAMETER_STEP_S
    delay_steps: np.ndarray
    combo: np.ndarray | None = None  # row of the curve table per perfused voxel


def reference_grid(cfg: PhantomConfig) -> Grid:
    """Axial grid centred on the head: columns +x, rows +y, slices +z around z = 0."""
    p = cfg.pixel_mm
    low = cfg.slab_mm[0] + cfg.slice_thickness_mm / 2
    affine = np.array(
        [
            [p, 0, 0, -(cfg.matrix - 1) * p / 2],
            [0, p, 0, -(cfg.matrix - 1) * p / 2],
            [0, 0, cfg.slice_thickness_mm, low],
        ]
    )
    return Grid((cfg.slices, cfg.matrix, cfg.matrix), affine)


def generate_phantom(cfg: PhantomConfig) -> PhantomStudy:
    """Simulate the study described by ``cfg`` (deterministic for a given ``cfg.seed``).

    Raises ValueError if the lesion, although placed validly, contains no core voxel on this grid.
    """
    rng_fields, rng_noise, rng_motion = np.random.default_rng(cfg.seed).spawn(3)
    fields = _Fields(*(SmoothField.random(rng_fields, FIELD_CORRELATION_MM) for _ in range(4)))
    lesion = (
        Lesion(cfg.lesion_centre_mm, cfg.lesion_core_radius_mm, cfg.lesion_penumbra_radius_mm) if cfg.lesion else None
    )
    grid = reference_grid(cfg)
    scene = _scene(cfg, grid, fields, lesion)
    if lesion is not None and not np.isin(scene.labels, CORE_LABELS).any():
        raise ValueError(
            "the lesion has no core voxel in the imaged slices; enlarge lesion_core_radius_mm, "
            "move lesion_centre_mm towards a slice centre, or use more slices"
        )
    motions = draw_motions(rng_motion, cfg.motion_volumes, cfg.motion_translation_mm, cfg.motion_rotation_deg)
    # Images are rendered on ``fine`` (the study grid, or a finer one averaged back: partial volume).
    fine = grid if cfg.supersample == 1 else _supersampled(grid, cfg.supersample)
    still = scene if cfg.supersample == 1 else _scene(cfg, fine, fields, lesion)
    moved = {m.volume: _scene(cfg, moved_grid(fine, m), fields, lesion) for m in motions}
    pose_of = {m.volume: m for m in motions}
    slice_scenes = [
        (sm, [_scene(cfg, moved_grid(fine, pose), fields, lesion) for pose in sm.poses(pose_of.get(sm.volume))])
        for sm in cfg.slice_motions
    ]

    times = np.arange(cfg.duration_s, dtype=np.float64)
    aif_fine = reference_aif(np.arange(int(round(times[-1] / FINE_STEP_S)) + 1) * FINE_STEP_S)
    extra = [s for _, scenes in slice_scenes for s in scenes]
    rendered = [still] if still is scene else [scene, still]
    table = _tissue_table([*rendered, *moved.values(), *extra], aif_fine, times, cfg.residue)
    vessels = _vessel_curves(aif_fine, times)

    sigma_px = cfg.noise_correlation_mm / cfg.pixel_mm
    hu = np.empty((times.size, *grid.shape), dtype=np.float32)
    for t in range(times.size):
        vessels_t = {k: c[t] for k, c in vessels.items()}
        volume = _render(moved.get(t, still), table[t], vessels_t)
        for sm, scenes in slice_scenes:
            if sm.volume == t:
                _render_slices(volume, sm, scenes, table[t], vessels_t)
        hu[t] = _block_mean(volume, cfg.supersample)
        if cfg.noise_hu > 0:
            hu[t] += correlated_noise(rng_noise, grid.shape, cfg.noise_hu, sigma_px)
        np.maximum(hu[t], np.float32(HU_FLOOR), out=hu[t])
    spacing = cfg.spacing_mm
    origin = tuple(float(v) for v in grid.affine[:, 3])
    return PhantomStudy(
        hu, times, spacing, origin, vessels[PROXIMAL_ARTERY].astype(np.float64), _truth(scene), cfg, motions
    )


def _scene(cfg: PhantomConfig, grid: Grid, fields: _Fields, lesion: Lesion | None) -> _Scene:
    labels, vessel_kind = head_labels(grid, lesion)
    x, y, z = grid.coords()
    by_label = np.zeros(256, dtype=np.float32)
    for label, value in BASELINE_HU.items():
        by_label[label] = value
    baseline = by_label[labels]
    tissue = labels != TissueLabel.AIR
    baseline[tissue] += np.float32(cfg.baseline_variation_hu) * fields.baseline(x, y, z)[tissue]

    parenchyma = np.flatnonzero(np.isin(labels, list(PERFUSION)))
    flat = [c.reshape(-1)[parenchyma] for c in np.broadcast_arrays(x, y, z)]
    lab = labels.reshape(-1)[parenchyma]
    cbf_c, mtt_c, delay_c = (np.zeros(256, dtype=np.float64) for _ in range(3))
    for label, p in PERFUSION.items():
        cbf_c[label], mtt_c[label], delay_c[label] = p.cbf, p.mtt, p.delay
    cbf = cbf_c[lab] * (1.0 + cfg.perfusion_variation * fields.cbf(*flat))
    mtt = mtt_c[lab] * (1.0 + cfg.perfusion_variation * fields.mtt(*flat))
    delay = np.maximum(delay_c[lab] + cfg.delay_variation_s * fields.delay(*flat), 0.0)
    return _Scene(
        labels=labels,
        vessels={kind: np.flatnonzero(vessel_kind == kind) for kind in VESSEL_KINDS},
        baseline_hu=baseline,
        parenchyma=parenchyma,
        flow_scale=(cbf / 6000.0 / K_HAEMATOCRIT_DENSITY).astype(np.float32),
        mtt_steps=np.maximum(np.rint(mtt / PARAMETER_STEP_S), 1).astype(np.int32),
        delay_steps=np.rint(delay / PARAMETER_STEP_S).astype(np.int32),
    )


def _tissue_table(scenes: list[_Scene], aif_fine: np.ndarray, times: np.ndarray, residue: str) -> np.ndarray:
    """float32 (T, n_combos) curves; sets each scene's ``combo`` index."""
    keys = [s.mtt_steps.astype(np.int64) * 100_000 + s.delay_steps for s in scenes]
    unique, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    start = 0
    for scene, key in zip(scenes, keys, strict=True):
        scene.combo = inverse[start : start + key.size].astype(np.int32)
        start += key.size
    curves = curve_table(aif_fine, times, unique // 100_000, unique % 100_000, residue)
    return np.ascontiguousarray(curves.T, dtype=np.float32)


def _vessel_curves(aif_fine: np.ndarray, times: np.ndarray) -> dict[int, np.ndarray]:
    """HU above baseline at ``times`` for each vessel kind."""
    index = np.rint(times / FINE_STEP_S).astype(np.int64)
    distal = delayed_dispersed(aif_fine, FINE_STEP_S, DISTAL_ARTERY_DELAY_S, DISTAL_ARTERY_DISPERSION_S)
    sinus = delayed_dispersed(aif_fine, FINE_STEP_S, SINUS_DELAY_S, SINUS_DISPERSION_S)
    collateral = delayed_dispersed(aif_fine, FINE_STEP_S, COLLATERAL_DELAY_S, COLLATERAL_DISPERSION_S)
    return {
        PROXIMAL_ARTERY: aif_fine[index],
        DISTAL_ARTERY: distal[index],
        SINUS: sinus[index],
        COLLATERAL_ARTERY: collateral[index],
    }


def _render(scene: _Scene, curves_t: np.ndarray, vessels_t: dict[int, float]) -> np.ndarray:
    """HU of one time point: baseline + tissue enhancement + vessel enhancement."""
    out = scene.baseline_hu.copy()
    flat = out.reshape(-1)
    flat[scene.parenchyma] += scene.flow_scale * curves_t[scene.combo]
    for kind, value in vessels_t.items():
        flat[scene.vessels[kind]] += np.float32(value)
    return out


def _supersampled(grid: Grid, factor: int) -> Grid:
    """``factor`` x ``factor`` sub-pixels per pixel in-plane, whose block means are the grid's pixels."""
    linear = grid.affine[:, :3].copy()
    linear[:, :2] /= factor
    origin = grid.affine[:, 3] - (factor - 1) / 2 * (linear[:, 0] + linear[:, 1])
    z, y, x = grid.shape
    return Grid((z, y * factor, x * factor), np.concatenate([linear, origin[:, None]], axis=1))


def _block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return volume
    z, y, x = volume.shape
    return volume.reshape(z, y // factor, factor, x // factor, factor).mean(axis=(2, 4), dtype=np.float32)


def _render_slices(
    volume: np.ndarray, motion: SliceMotion, scenes: list[_Scene], curves_t: np.ndarray, vessels_t: dict[int, float]
) -> None:
    """Overwrite the moved slices of ``volume`` with the mean of the scenes of their pose(s)."""
    rows = slice(motion.first_slice, motion.last_slice + 1)
    mean = np.mean([_render(s, curves_t, vessels_t)[rows] for s in scenes], axis=0)
    volume[rows] = mean.astype(np.float32)


def _truth(scene: _Scene) -> PerfusionTruth:
    shape = scene.labels.shape
    maps = {name: np.zeros(shape, dtype=np.float32) for name in ("cbf", "cbv", "mtt", "delay")}
    cbf = scene.flow_scale.astype(np.float64) * 6000.0 * K_HAEMATOCRIT_DENSITY
    mtt = scene.mtt_steps * PARAMETER_STEP_S
    delay = scene.delay_steps * PARAMETER_STEP_S
    for name, values in (("cbf", cbf), ("cbv", cbf * mtt / 60.0), ("mtt", mtt), ("delay", delay)):
        maps[name].reshape(-1)[scene.parenchyma] = values
    return PerfusionTruth(
        cbf=maps["cbf"],
        cbv=maps["cbv"],
        mtt=maps["mtt"],
        tmax=maps["delay"].copy(),
        delay=maps["delay"],
        labels=scene.labels,
        core_mask=np.isin(scene.labels, CORE_LABELS),
        penumbra_mask=np.isin(scene.labels, PENUMBRA_LABELS),
        brain_mask=np.isin(scene.labels, INTRACRANIAL_LABELS),
    )
