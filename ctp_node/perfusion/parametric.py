"""Model-based deconvolution: fit ``C(t) = F * (AIF conv R_{MTT, d})(t)`` per voxel over a dictionary.

Truncated SVD smooths the residue: with a broad AIF (first pass ~9 s wide plus recirculation) it
lowers CBF by half and moves Tmax seconds late (see tests/perfusion/test_phantom.py). A physiological
residue model with three parameters (flow F, mean transit time MTT, delay d) has no such bias when
the residue family is right, and is robust to noise because it fits three numbers, not a curve
(the approach of model-based perfusion estimation, e.g. Mouridsen et al., NeuroImage 2006).

The fit is an exhaustive search over a dictionary of (MTT, delay) pairs: each atom is the AIF,
linearly interpolated onto a fine grid, convolved with the residue and sampled at the acquisition
times themselves (so non-uniform sampling needs no resampling of the tissue curves). For each voxel
the atom with the largest positive projection wins and F is its least-squares amplitude. Voxel-
vectorised as one matrix product per chunk.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import special

from ctp_node.perfusion.deconvolution import ResidueStats
from ctp_node.perfusion.timing import BASELINE_MARGIN_S, interpolation_matrix

ResidueFamily = Literal["exponential", "box", "gamma"]
MTT_GRID_S = np.geomspace(1.0, 30.0, 40)  # ~9 % steps
DELAY_GRID_S = np.arange(0.0, 15.001, 0.25)
# "gamma": transit times gamma-distributed (capillary transit-time heterogeneity, Mouridsen et al.,
# JCBFM 2014), R(t) = 1 - GammaCDF(t; a, MTT / a); a = 1 is the exponential, a -> inf the box residue.
# The fit picks the shape too, so it is unbiased across the residue families in use. Coarser MTT and
# delay grids keep the dictionary small; the delay is refined by a parabola through the fit quality.
GAMMA_SHAPES = (1.0, 2.0, 4.0, np.inf)
# One shape for the whole study (``select_shape``), chosen among these: the curve of one voxel does not
# identify its shape at CT noise levels, and leaving it free per voxel biases the MTT (see
# ``select_shape``); pooled over a study's tissue it is well determined, so the grid can be finer.
STUDY_SHAPES = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, np.inf)
SHAPE_SAMPLE_VOXELS = 20_000
SHAPE_BLOCK_MM = 12.0  # in-plane blocks whose mean curves choose the shape
SHAPE_MAX_DELAY_S = 3.0  # of normally perfused tissue (first-pass delay)
SHAPE_MIN_CURVES = 8  # fewer (blocks of) curves: no study shape, each voxel chooses
# Finer grids for the choice of shape: on the fit's grids the residual left by the grid's spacing is
# as large as the difference between neighbouring shapes (noise-free, shape 3 came out as 2).
SHAPE_MTT_GRID_S = np.geomspace(1.0, 30.0, 48)
SHAPE_DELAY_GRID_S = np.arange(-0.5, 15.001, 0.25)
GAMMA_MTT_GRID_S = np.geomspace(1.0, 30.0, 24)  # ~15 % steps
# The delay grid starts below 0: tissue can lead the chosen AIF by a fraction of a second (the AIF
# voxel lies downstream, the sampling phase, or a discretely convolved simulation such as the OSIPI
# DSC test data, whose tissue curves lead continuous-time physics by half a frame). Without negative
# atoms such a curve is fitted with too short an MTT and CBF = CBV / MTT comes out 50 % high
# (tests/perfusion/test_osipi_dsc.py). The reported Tmax is clipped at 0.
GAMMA_DELAY_GRID_S = np.arange(-0.5, 15.001, 0.5)
FINE_STEP_S = 0.05
OFFSET_CHUNK = 32768
CHUNK_VOXELS = 256  # the (chunk, atoms) projection stays in cache: ~2x faster than large chunks


def _residue(t: np.ndarray, mtt_s: float, family: ResidueFamily, shape: float = 1.0) -> np.ndarray:
    if family == "exponential":
        return np.exp(-t / mtt_s)
    if family == "box" or (family == "gamma" and np.isinf(shape)):
        return (t < mtt_s).astype(np.float64)
    if family == "gamma":
        return special.gammaincc(shape, t * shape / mtt_s)
    raise ValueError(f"unknown residue family {family!r}: use 'exponential', 'box' or 'gamma'")


def dictionary(
    times_s: np.ndarray,
    aif: np.ndarray,
    family: ResidueFamily = "exponential",
    mtt_grid_s: np.ndarray | None = None,
    delay_grid_s: np.ndarray | None = None,
    acquired_s: np.ndarray | None = None,
    shapes: tuple[float, ...] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Atoms (M, T) sampled at ``times_s`` (F = 1/s scale, HU), their MTT (M,) and delay (M,).

    Atoms are ordered (shape, MTT, delay), delay fastest. ``acquired_s``: when ``times_s`` is a grid
    the curves were linearly resampled to from these acquisition times, the atoms are sampled at them
    and resampled the same way. Otherwise, at 4-8 s sampling, a smooth atom never matches a
    piecewise-linear curve and the fit escapes to the shortest MTT and zero delay (the atom closest
    to the piecewise-linear AIF itself). ``shapes``: the gamma shapes (default ``GAMMA_SHAPES``)."""
    gamma = family == "gamma"
    if mtt_grid_s is None:
        mtt_grid_s = GAMMA_MTT_GRID_S if gamma else MTT_GRID_S
    if delay_grid_s is None:
        delay_grid_s = GAMMA_DELAY_GRID_S if gamma else DELAY_GRID_S
    shapes = (tuple(shapes) if shapes is not None else GAMMA_SHAPES) if gamma else (1.0,)
    times = np.asarray(times_s, dtype=np.float64) - float(times_s[0])
    fine = np.arange(0.0, times[-1] + FINE_STEP_S, FINE_STEP_S)
    aif_fine = np.interp(fine, times, np.asarray(aif, dtype=np.float64))
    n = fine.size
    size = 1 << int(np.ceil(np.log2(2 * n)))
    aif_spec = np.fft.rfft(aif_fine, size)
    kernels = np.stack([_residue(fine, float(m), family, a) for a in shapes for m in mtt_grid_s])
    kernels[:, 0] *= 0.5  # trapezoid rule
    conv = np.fft.irfft(aif_spec[None, :] * np.fft.rfft(kernels, size, axis=1), size, axis=1)[:, :n] * FINE_STEP_S
    sample = np.rint(times / FINE_STEP_S).astype(np.int64)
    shifts = np.rint(np.asarray(delay_grid_s) / FINE_STEP_S).astype(np.int64)
    index = sample[None, :] - shifts[:, None]  # (D, T)
    atoms = np.where(index[None] >= 0, conv[:, np.clip(index, 0, n - 1)], 0.0)  # (shape x MTT, D, T)
    mtts = np.tile(np.asarray(mtt_grid_s, dtype=np.float64), len(shapes))
    mtt = np.repeat(mtts, len(delay_grid_s))
    delay = np.tile(np.asarray(delay_grid_s, dtype=np.float64), mtts.size)
    atoms = atoms.reshape(-1, times.size)
    if acquired_s is not None:
        grid = np.asarray(times_s, dtype=np.float64)
        acquired = np.asarray(acquired_s, dtype=np.float64)
        if acquired.size != grid.size or not np.allclose(acquired, grid):
            resample = interpolation_matrix(acquired, grid) @ interpolation_matrix(grid, acquired)  # (T, T)
            atoms = atoms @ resample.T
    return atoms, mtt, delay


@dataclass(frozen=True)
class StudyFit:
    """How a study's curves were fitted (``deconvolve_parametric``): later refits of some of its voxels
    (``low_flow``, ``uncertainty``) repeat it with these."""

    grid_s: np.ndarray
    aif_grid: np.ndarray
    arrival_s: float
    acquired_s: np.ndarray
    family: ResidueFamily
    residue_shape: float | None  # the study's gamma shape; None: each voxel chose

    def refit(
        self, curves: np.ndarray, basis: np.ndarray | None, first_tmax_s: np.ndarray | None = None
    ) -> tuple[ResidueStats, np.ndarray]:
        """``deconvolve_parametric`` of (n, N) grid ``curves`` as the study was fitted."""
        return deconvolve_parametric(
            curves, self.grid_s, self.aif_grid, self.family, basis=basis, arrival_s=self.arrival_s,
            acquired_s=self.acquired_s, shape=self.residue_shape if self.family == "gamma" else None,
            first_tmax_s=first_tmax_s,
        )  # fmt: skip


def deconvolve_parametric(
    conc: np.ndarray,
    times_s: np.ndarray,
    aif: np.ndarray,
    family: ResidueFamily = "exponential",
    chunk: int = CHUNK_VOXELS,
    basis: np.ndarray | None = None,
    arrival_s: float | None = None,
    acquired_s: np.ndarray | None = None,
    shape: float | Literal["study"] | None = None,
    shape_groups: np.ndarray | None = None,
    first_tmax_s: np.ndarray | None = None,
) -> tuple[ResidueStats, np.ndarray]:
    """Flow (1/s) and Tmax (= delay, s) per voxel for (V, T) curves at ``times_s``; also the fitted MTT.

    ``basis`` (K, T) orthonormal rows: the curves lie in its span (e.g. after ``denoise``), so the
    projections are computed on K coefficients instead of T samples (same numbers, faster). The
    delay is refined between grid points by a parabola through the projections of the best atom's
    delay neighbours.

    ``arrival_s`` (time of the AIF's foot, same clock as ``times_s``): a second pass. The baseline
    offset of each curve is re-estimated from every frame before its fitted bolus arrival (frames
    before ``arrival_s + delay - BASELINE_MARGIN_S``), not only from the frames before the AIF:
    delayed tissue has more clean baseline frames, and a wrong offset is the largest error of
    low-flow curves. The curves, less that offset, are fitted again; ``stats.offset_hu`` returns it.
    The offset is fixed from the first pass's delay rather than fitted with each atom, so the atom
    choice cannot exploit noise in it. ``acquired_s``: the acquisition times when ``times_s`` is a
    finer grid resampled from them; a grid frame then counts as baseline only up to the last
    acquisition before the limit (later grid frames are interpolated towards the enhanced one).
    ``shape`` (family "gamma"): fit with this one residue shape instead of ``GAMMA_SHAPES`` per voxel;
    "study": the shape ``select_shape`` finds in the curves less their re-estimated offsets (a
    constant offset looks like a tail, and the offset of S0 from a few noisy baseline frames made
    the exponential win on a family B study at 6 HU), with ``arrival_s``. ``stats.residue_shape``
    returns it. ``shape_groups`` (V,) int: the halves of spatial blocks whose mean curves choose it
    (``select_shape``).
    """
    study_shape = isinstance(shape, str)
    if study_shape and (shape != "study" or family != "gamma" or shape_groups is None):
        raise ValueError(f"shape {shape!r}: a number, None, or 'study' with the gamma family and shape_groups")
    shapes = None if shape is None or study_shape else (float(shape),)
    if first_tmax_s is not None and arrival_s is not None:
        first = ResidueStats(flow=np.zeros(conc.shape[0]), tmax_s=np.asarray(first_tmax_s, dtype=np.float64))
    else:
        first, fitted_mtt = _fit(conc, times_s, aif, family, chunk, basis, acquired_s, shapes)
    if arrival_s is None:
        if study_shape:
            raise ValueError("shape='study' needs arrival_s (the shape is chosen on offset-corrected curves)")
        return dataclasses.replace(first, residue_shape=None if shapes is None else shapes[0]), fitted_mtt
    t = np.asarray(times_s, dtype=np.float64)
    data = np.asarray(conc, dtype=np.float32)
    offset = np.zeros(data.shape[0], dtype=np.float32)
    for start in range(0, data.shape[0], OFFSET_CHUNK):
        part = slice(start, start + OFFSET_CHUNK)
        limit = arrival_s + first.tmax_s[part] - BASELINE_MARGIN_S
        if acquired_s is not None:
            acquired = np.asarray(acquired_s, dtype=np.float64)
            before = np.searchsorted(acquired, limit, side="left") - 1  # last acquisition < limit
            limit = np.where(before >= 0, acquired[np.maximum(before, 0)] + 1e-6, -np.inf)
        pre = t[None, :] < limit[:, None]
        count = pre.sum(axis=1)
        sums = np.where(pre, data[part], 0.0).sum(axis=1)
        offset[part] = np.where(count > 0, sums / np.maximum(count, 1), 0.0)
    corrected = data - offset[:, None]
    if study_shape:
        # Normally perfused tissue only: a block that mixes delays averages to a dispersed curve.
        groups = np.where(first.tmax_s < SHAPE_MAX_DELAY_S, shape_groups, -1)
        chosen = select_shape(corrected, groups, times_s, aif, basis, acquired_s)
        shapes = None if chosen is None else (chosen,)
    second, fitted_mtt = _fit(corrected, times_s, aif, family, chunk, basis, acquired_s, shapes)
    stats = ResidueStats(
        flow=second.flow, tmax_s=second.tmax_s, offset_hu=offset.astype(np.float64),
        residue_shape=None if shapes is None else shapes[0], first_tmax_s=first.tmax_s,
    )  # fmt: skip
    return stats, fitted_mtt


def _fit(
    conc: np.ndarray,
    times_s: np.ndarray,
    aif: np.ndarray,
    family: ResidueFamily,
    chunk: int,
    basis: np.ndarray | None,
    acquired_s: np.ndarray | None = None,
    shapes: tuple[float, ...] | None = None,
) -> tuple[ResidueStats, np.ndarray]:
    """One pass of the dictionary fit (see ``deconvolve_parametric``)."""
    atoms, mtt, delay = dictionary(times_s, aif, family, acquired_s=acquired_s, shapes=shapes)
    n_delays = int(np.flatnonzero(np.diff(delay) < 0)[0]) + 1 if np.any(np.diff(delay) < 0) else delay.size
    delay_step = float(delay[1] - delay[0]) if n_delays > 1 else 0.0
    rows_mtt = mtt[::n_delays]  # one per (shape, MTT), the MTT grid repeated per shape
    n_mtts = int(np.flatnonzero(np.diff(rows_mtt) <= 0)[0]) + 1 if np.any(np.diff(rows_mtt) <= 0) else rows_mtt.size
    mtt_ratio = float(rows_mtt[1] / rows_mtt[0]) if n_mtts > 1 else 1.0
    norms = np.linalg.norm(atoms, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    unit = (atoms / safe[:, None]).astype(np.float32)
    data = np.asarray(conc, dtype=np.float32)
    if basis is not None:
        basis = np.asarray(basis, dtype=np.float32)
        unit = unit @ basis.T  # (M, K)
    flow = np.zeros(conc.shape[0], dtype=np.float64)
    tmax = np.zeros(conc.shape[0], dtype=np.float64)
    fitted_mtt = np.zeros(conc.shape[0], dtype=np.float64)
    for start in range(0, conc.shape[0], chunk):
        part = slice(start, start + chunk)
        block = data[part] if basis is None else data[part] @ basis.T
        projection = block @ unit.T  # (v, M)
        rows = np.arange(projection.shape[0])
        best = np.argmax(projection, axis=1)
        amplitude = projection[rows, best].astype(np.float64)
        positive = (amplitude > 0) & (norms[best] > 0)
        j = best % n_delays
        left = np.where(j > 0, projection[rows, best - (j > 0)], amplitude).astype(np.float64)
        right = np.where(j < n_delays - 1, projection[rows, best + (j < n_delays - 1)], amplitude).astype(np.float64)
        curvature = left - 2.0 * amplitude + right
        with np.errstate(divide="ignore", invalid="ignore"):
            offset = np.where(curvature < 0, 0.5 * (left - right) / curvature, 0.0)
        offset = np.clip(offset, -0.5, 0.5)
        flow[part] = np.where(positive, amplitude / norms[best], 0.0)
        tmax[part] = np.where(positive, np.maximum(delay[best] + offset * delay_step, 0.0), 0.0)
        # MTT refined the same way, along log MTT (the grid is geometric): without it the map takes
        # only the grid's values (~15 % steps), and a whole tissue class lands on one of them.
        k = (best // n_delays) % n_mtts
        lower = np.where(k > 0, projection[rows, best - n_delays * (k > 0)], amplitude).astype(np.float64)
        last = k < n_mtts - 1
        upper = np.where(last, projection[rows, best + n_delays * last], amplitude).astype(np.float64)
        curvature = lower - 2.0 * amplitude + upper
        with np.errstate(divide="ignore", invalid="ignore"):
            step = np.where(curvature < 0, 0.5 * (lower - upper) / curvature, 0.0)
        refined = mtt[best] * mtt_ratio ** np.clip(step, -0.5, 0.5)
        fitted_mtt[part] = np.where(positive, refined, 0.0)
    return ResidueStats(flow=flow, tmax_s=tmax), fitted_mtt


def select_shape(
    conc: np.ndarray,
    groups: np.ndarray,
    times_s: np.ndarray,
    aif: np.ndarray,
    basis: np.ndarray | None = None,
    acquired_s: np.ndarray | None = None,
    shapes: tuple[float, ...] = STUDY_SHAPES,
    sample: int = SHAPE_SAMPLE_VOXELS,
) -> float | None:
    """The gamma residue shape that fits a study's (V, T) tissue curves best, pooled over them.

    Why one shape per study: a curve pins down ``delay + MTT (1 + 1/shape) / 2`` and its area well,
    the three apart poorly. Free per voxel, the shape is chosen nearly at random under noise, and the
    errors are one-sided where the truth sits at the end of the range (an exponential residue, the
    most dispersed shape, can only be mistaken for a narrower one, whose MTT is longer for the same
    curve): family A at 6 HU, white-matter MTT +33 % and penumbra delay -1.2 s; in a Monte Carlo on
    exponential residues (10 HU peak, 1 HU noise) MTT +16 %, delay -0.5 s. With the shape fixed to
    the truth, the MTT and delay of the same noisy curves come out unbiased (medians exact). The
    shape of the whole tissue is better determined: the one whose best atoms explain the most of the
    mean curves of ``groups`` (label 2 b and 2 b + 1: the two interleaved halves of spatial block b of
    normally perfused tissue, -1: not used), each half's atom judged on the other half (the
    strongest 10 % of single curves, judged on themselves, chose the exponential for family B, whose
    truth is 2). At most ``sample`` blocks, evenly spaced; finer MTT and delay grids than the fit's.
    None: fewer than ``SHAPE_MIN_CURVES`` blocks to choose from.
    """
    data = np.asarray(conc, dtype=np.float32)
    if basis is not None:
        data = data @ np.asarray(basis, dtype=np.float32).T
    halves = _paired_half_means(data, np.asarray(groups))
    if halves is None:
        return None
    first, second = halves
    if first.shape[0] > sample:
        keep = np.linspace(0, first.shape[0] - 1, sample).astype(np.int64)
        first, second = first[keep], second[keep]
    # Cross-validated: each half's best atom is judged on the other half, whose noise it has not
    # seen. Judged on the same curves, the noise left after filtering fits a little better to some
    # shapes than to others, and over a study that outweighed the shapes' real difference (block
    # means themselves still chose 4 for a box residue at 6 HU).
    units = [_unit_atoms(times_s, aif, shape, basis, acquired_s) for shape in shapes]
    scores = [_cross_explained(first, second, unit) for unit in units]
    return float(shapes[int(np.argmax(scores))])


def _unit_atoms(
    times_s: np.ndarray, aif: np.ndarray, shape: float, basis: np.ndarray | None, acquired_s: np.ndarray | None
) -> np.ndarray:
    """(M, T or K) unit-norm atoms of one gamma shape on the shape-choice grids (on ``basis`` if given)."""
    atoms, _, _ = dictionary(
        times_s, aif, "gamma", SHAPE_MTT_GRID_S, SHAPE_DELAY_GRID_S, acquired_s=acquired_s, shapes=(shape,)
    )
    norms = np.linalg.norm(atoms, axis=1)
    unit = (atoms / np.where(norms > 0, norms, 1.0)[:, None]).astype(np.float32)
    return unit if basis is None else unit @ np.asarray(basis, dtype=np.float32).T


def _cross_explained(first: np.ndarray, second: np.ndarray, unit: np.ndarray) -> float:
    """Energy of each half explained by the atom the other half chose (amplitude fitted: one dof)."""
    total = 0.0
    for start in range(0, first.shape[0], CHUNK_VOXELS * 16):
        a = first[start : start + CHUNK_VOXELS * 16] @ unit.T
        b = second[start : start + CHUNK_VOXELS * 16] @ unit.T
        rows = np.arange(a.shape[0])
        on_b = b[rows, np.argmax(a, axis=1)].astype(np.float64)
        on_a = a[rows, np.argmax(b, axis=1)].astype(np.float64)
        total += float(np.sum(np.maximum(on_b, 0.0) ** 2) + np.sum(np.maximum(on_a, 0.0) ** 2))
    return total


def _paired_half_means(data: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Mean rows of the two halves (labels 2 b and 2 b + 1) of every block b whose halves each hold
    at least half as many rows as the largest half; None: fewer than ``SHAPE_MIN_CURVES`` blocks."""
    use = groups >= 0
    labels, inverse = np.unique(groups[use], return_inverse=True)
    if labels.size == 0:
        return None
    counts = np.bincount(inverse, minlength=labels.size)
    sums = np.zeros((labels.size, data.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, data[use])
    full = counts >= 0.5 * counts.max()
    means = {int(label): sums[i] / counts[i] for i, label in enumerate(labels) if full[i]}
    blocks = sorted({label // 2 for label in means if label % 2 == 0 and label + 1 in means})
    if len(blocks) < SHAPE_MIN_CURVES:
        return None
    first = np.stack([means[2 * b] for b in blocks]).astype(np.float32)
    second = np.stack([means[2 * b + 1] for b in blocks]).astype(np.float32)
    return first, second
