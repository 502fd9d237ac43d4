"""Vessel curves between sparse acquisitions: a gamma-variate bolus fitted per voxel, not straight lines.

Arteries, veins and sinuses rise far above the model's 0..80 HU window, so the model cannot fill
them; linear interpolation cuts the bolus peak (at 4-8 s sampling the arterial peak falls between
samples). Here each such voxel's acquired samples ``y_k`` at times ``t_k`` are fitted with

    f(t) = b + A * (g(t) + r * G(t))
    g(t) = (s / tp)**alpha * exp(alpha * (1 - s / tp)),  s = t - t0 > 0 (0 before): the first pass,
           a gamma variate of peak 1 at t0 + tp;
    G(t) = 1 - exp(-(s - tp) / w) for s > tp (0 before), w = tp / sqrt(alpha): recirculation, a
           smooth step that starts at the first-pass peak and settles within a few bolus widths w,

with b (baseline), A (bolus height), A * r (recirculation level) solved by linear least squares for
given (t0, tp, alpha) (variable projection; r >= 0 enforced), and (t0, tp, alpha) found by a search
over a dictionary of shapes followed by a vectorised Levenberg-Marquardt refinement over all voxels
at once (a few seconds for the ~100 000 vessel voxels of a 512 x 512 x 16 study; measured in
docs/benchmarks.md). A weak prior on the bolus width (``_prior``) decides between shapes that the
samples cannot tell apart (8 s sampling puts only two samples on an arterial bolus). The filled
curve is ``f(t)`` plus the linear interpolation in time of the residuals ``y_k - f(t_k)``: it passes
exactly through every acquired sample (the acquired seconds stay the acquired volumes) and keeps the
samples' noise, while the shape between samples is the fitted bolus.

A fit is kept only where it is credible; otherwise the voxel stays linear (``FitResult.accepted``):

- the voxel is a candidate (``candidates``): its samples rise at least 40 HU, and at least 6 noise
  sigmas, above the lowest sample before them (noise alone, 5-10 HU, does not);
- A > 0, r >= 0, and a plausible bolus width ``tp / sqrt(alpha)`` of 0.8..12 s (FWHM about 2..29 s;
  the search keeps tp within 1.5..40 s and alpha within 0.7..100, so near-Gaussian boluses fit too);
- the fitted peak time lies within the acquired times (a peak before the first or after the last
  sample is an extrapolation);
- the fitted peak is at most ``max_overshoot`` (default 1.6) times the largest sampled enhancement
  (a narrow spike between samples is not supported by the data);
- the fit passes through the samples within noise: RMS residual <= 2 sigma + 4 % of the enhancement
  and largest residual <= 4 sigma + 10 % of the enhancement (sigma: the series' noise, estimated by
  ``estimate_noise_hu``; the relative part tolerates the difference between a real bolus and the
  gamma-variate family).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MIN_ENHANCEMENT_HU = 40.0
NOISE_MULTIPLE = 6.0
MAX_OVERSHOOT = 1.6
TP_BOUNDS_S = (1.5, 40.0)
ALPHA_BOUNDS = (0.7, 100.0)
WIDTH_BOUNDS_S = (0.8, 12.0)  # tp / sqrt(alpha): about FWHM / 2.4
RMS_TOLERANCE = (2.0, 0.04)  # sigma multiple, fraction of the enhancement
MAX_TOLERANCE = (4.0, 0.10)
MIN_SAMPLES = 5
PRIOR_WIDTH_S, PRIOR_ALPHA, PRIOR_SPREAD = 3.8, 5.0, (2.0, 4.0)
AMBIGUITY_CHI2, AMBIGUITY_HEIGHT, AMBIGUITY_TIME_S = 4.0, 0.2, 2.0
_DICT_TP_S = (3.0, 5.0, 7.5, 11.0, 16.0)
_DICT_ALPHA = (2.0, 4.0, 8.0, 16.0)
_DICT_PEAK_STEP_S = 1.0
_LM_ITERATIONS = 5
_CHUNK = 4096


@dataclass
class FitResult:
    """Per-voxel fit of ``samples`` (n, V) at ``times_s`` (n,).

    ``params``: float64 (V, 6) = (b, A, A r, t0, tp, alpha); ``accepted``: bool (V,) fits kept;
    ``residuals``: float64 (n, V) samples minus fitted curve at the acquired times.
    """

    times_s: np.ndarray
    params: np.ndarray
    accepted: np.ndarray
    residuals: np.ndarray

    def values(self, t_s: float, voxels: np.ndarray | None = None) -> np.ndarray:
        """The filled curve at time ``t_s`` (within the acquired times): fit + interpolated residual."""
        times = self.times_s
        if not times[0] - 1e-9 <= t_s <= times[-1] + 1e-9:
            raise ValueError(f"{t_s:g} s lies outside the fitted samples ({times[0]:g}..{times[-1]:g} s)")
        p = self.params if voxels is None else self.params[voxels]
        res = self.residuals if voxels is None else self.residuals[:, voxels]
        right = int(np.clip(np.searchsorted(times, t_s, side="left"), 1, times.size - 1))
        w = (t_s - times[right - 1]) / (times[right] - times[right - 1])
        correction = (1.0 - w) * res[right - 1] + w * res[right]
        return curve(np.array([t_s]), p)[:, 0] + correction

    def subset(self, keep: np.ndarray) -> FitResult:
        """The fits of the voxels selected by ``keep`` (bool or indices)."""
        return FitResult(self.times_s, self.params[keep], self.accepted[keep], self.residuals[:, keep])


def curve(t_s: np.ndarray, params: np.ndarray) -> np.ndarray:
    """f(t) (module docstring) for each voxel's params (V, 6) at times (n,): (V, n)."""
    b, a, ar, t0, tp, alpha = (params[:, i : i + 1] for i in range(6))
    g, rec = _basis(np.asarray(t_s, dtype=np.float64)[None, :], t0, tp, alpha)
    return b + a * g + ar * rec


def candidates(samples: np.ndarray, noise_hu: float, min_enhancement_hu: float = MIN_ENHANCEMENT_HU) -> np.ndarray:
    """bool (V,): voxels whose samples (n, V) rise at least ``enhancement_threshold`` above their baseline."""
    return enhancement(samples) >= enhancement_threshold(noise_hu, min_enhancement_hu)


def enhancement_threshold(noise_hu: float, min_enhancement_hu: float = MIN_ENHANCEMENT_HU) -> float:
    """The rise that makes a voxel a candidate: ``min_enhancement_hu``, or ``NOISE_MULTIPLE`` noise
    sigmas if more (the largest rise among 16 noisy samples reaches about 5 sigma by chance)."""
    return max(float(min_enhancement_hu), NOISE_MULTIPLE * float(noise_hu))


def enhancement(samples: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Largest rise of each voxel's samples (n, ...) over the lowest sample before it: (...).

    ``samples`` may be a list of volumes (not stacked: no copy of a whole series)."""
    lowest = np.asarray(samples[0], dtype=np.float32).copy()
    rise = np.zeros_like(lowest)
    for k in range(1, len(samples)):
        current = samples[k].astype(np.float32)
        np.maximum(rise, current - lowest, out=rise)
        np.minimum(lowest, current, out=lowest)
    return rise


def estimate_noise_hu(first: np.ndarray, second: np.ndarray) -> float:
    """Noise sigma (HU) of a series from two volumes: robust spread of their difference in soft tissue.

    Uses voxels within -100..150 HU in both (no air, bone or dense contrast); the median absolute
    difference ignores the few voxels where contrast arrives between the two volumes.
    """
    a, b = np.asarray(first, dtype=np.float32), np.asarray(second, dtype=np.float32)
    soft = (a > -100) & (a < 150) & (b > -100) & (b < 150)
    if not soft.any():
        return 10.0
    return float(1.4826 * np.median(np.abs(a[soft] - b[soft])) / np.sqrt(2.0))


def fit_curves(
    times_s: np.ndarray,
    samples: np.ndarray,
    noise_hu: float,
    *,
    max_overshoot: float = MAX_OVERSHOOT,
) -> FitResult:
    """Fit every voxel of ``samples`` (n, V) acquired at ``times_s`` (n,) (rules: module docstring).

    Call it with candidate voxels only (``candidates``); ``accepted`` says which fits to use.
    """
    times = np.asarray(times_s, dtype=np.float64)
    y = np.asarray(samples, dtype=np.float64)
    if times.ndim != 1 or y.ndim != 2 or y.shape[0] != times.size:
        raise ValueError(f"samples must be (n, V) with n = {times.size} times, got {y.shape}")
    if times.size > 1 and np.any(np.diff(times) <= 0):
        raise ValueError("times_s must increase strictly")
    n_vox = y.shape[1]
    params = np.zeros((n_vox, 6))
    if n_vox == 0 or times.size < MIN_SAMPLES:
        return FitResult(times, params, np.zeros(n_vox, dtype=bool), np.zeros_like(y))
    sigma = max(float(noise_hu), 1.0)
    atoms = _Dictionary.build(times, sigma)
    ambiguous = np.zeros(n_vox, dtype=bool)
    times32 = times.astype(np.float32)
    for start in range(0, n_vox, _CHUNK):
        stop = min(start + _CHUNK, n_vox)
        theta, ambiguous[start:stop] = atoms.search(y[:, start:stop], sigma)
        # float32 for the refinement (twice the speed; 16 samples, HU to 0.01): the fits it gives up on
        # (ambiguous ones) are not refined at all
        todo = np.flatnonzero(~ambiguous[start:stop])
        lin = _fit_linear(times, y[:, start:stop], theta)[0]
        if todo.size:
            chunk = y[:, start + todo].astype(np.float32)
            theta_r, lin_r = _refine(times32, chunk, theta[todo].astype(np.float32), sigma)
            theta[todo], lin[todo] = theta_r, lin_r
        params[start:stop] = np.column_stack([lin, theta])
    residuals = y - curve(times, params).T
    accepted = _credible(times, y, params, residuals, noise_hu, max_overshoot) & ~ambiguous
    return FitResult(times, params, accepted, residuals)


def _basis(t: np.ndarray, t0: np.ndarray, tp: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First pass g and recirculation G (module docstring), broadcast over t and the parameters."""
    s = t - t0
    x = np.maximum(s / tp, 1e-12)
    g = np.where(s > 0, np.exp(alpha * (np.log(x) + 1.0 - x)), 0.0)
    rec = -np.expm1(-np.maximum(x - 1.0, 0.0) * np.sqrt(alpha))  # time constant: the bolus's width
    return g, rec


def _prior(theta: np.ndarray, sigma: float) -> np.ndarray:
    """Pseudo-residuals (..., 2) in HU pulling the bolus width and skew weakly towards a typical bolus.

    Width ``tp / sqrt(alpha)`` (about FWHM / 2.4) towards ``PRIOR_WIDTH_S``, alpha towards
    ``PRIOR_ALPHA``: one noise sigma per factor ``PRIOR_SPREAD`` away. Negligible where the samples
    determine the shape (4 s sampling), decisive where they cannot (two samples on the bolus at 8 s,
    where a narrow tall and a broad low bolus fit equally well).
    """
    tp, alpha = theta[..., 1], theta[..., 2]
    width = tp / np.sqrt(alpha)
    return np.float32(sigma) * np.stack(
        [
            np.log(width / PRIOR_WIDTH_S) / np.log(PRIOR_SPREAD[0]),
            np.log(alpha / PRIOR_ALPHA) / np.log(PRIOR_SPREAD[1]),
        ],
        axis=-1,
    )


@dataclass
class _Dictionary:
    """A grid of shapes (t0, tp, alpha) with the orthonormalised basis [g, G] of each at the sample times.

    The baseline direction (a constant) is common to every atom, so it is projected out once: the
    samples and the atoms are centred, and each atom keeps two orthonormal directions (float32, the
    search is one matrix product per chunk of voxels).
    """

    theta: np.ndarray  # (D, 3)
    u: np.ndarray  # (2 D, n) float32 orthonormal rows, zero rows for degenerate directions
    pinv_a: np.ndarray  # (D, n) float32, the least-squares coefficient A of each atom (centred samples)
    penalty: np.ndarray  # (D,) float32 squared prior pseudo-residuals

    @classmethod
    def build(cls, times: np.ndarray, sigma: float) -> _Dictionary:
        peaks = np.arange(times[0], times[-1] + 1e-9, _DICT_PEAK_STEP_S)
        t_peak, tp, alpha = np.array(np.meshgrid(peaks, _DICT_TP_S, _DICT_ALPHA, indexing="ij")).reshape(3, -1)
        theta = np.column_stack([t_peak - tp, tp, alpha])
        g, rec = _basis(times[None, :], theta[:, :1], theta[:, 1:2], theta[:, 2:3])  # (D, n)
        seen = g.max(axis=1) > 0.05  # the bolus is seen by at least one sample
        theta, g, rec = theta[seen], g[seen], rec[seen]
        basis = np.stack([g - g.mean(axis=1, keepdims=True), rec - rec.mean(axis=1, keepdims=True)], axis=2)
        u, sv, vt = np.linalg.svd(basis, full_matrices=False)  # (D, n, 2), (D, 2), (D, 2, 2)
        keep = sv > 1e-6 * np.maximum(sv[:, :1], 1e-30)
        u = u * keep[:, None, :]
        inv = np.where(keep, 1.0 / np.where(keep, sv, 1.0), 0.0)
        pinv_a = np.einsum("dk,dk,dnk->dn", vt[:, :, 0], inv, u)
        rows = np.ascontiguousarray(np.transpose(u, (0, 2, 1)).reshape(-1, times.size), dtype=np.float32)
        penalty = (_prior(theta, sigma) ** 2).sum(axis=1).astype(np.float32)
        return cls(theta, rows, pinv_a.astype(np.float32), penalty)

    def search(self, y: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
        """Per voxel of ``y`` (n, V), the atom explaining most of it (A > 0), prior included: (V, 3);
        and whether the samples leave the bolus undetermined: (V,) bool, True where the atoms that fit
        about as well (within ``AMBIGUITY_CHI2`` sigma^2) disagree on the peak height by more than
        ``AMBIGUITY_HEIGHT`` of it or on the peak time by more than ``AMBIGUITY_TIME_S``."""
        centred = (y - y.mean(axis=0, keepdims=True)).astype(np.float32).T  # (V, n): atoms on the fast axis
        n_d = self.theta.shape[0]
        proj = (centred @ self.u.T).reshape(-1, n_d, 2)
        score = proj[..., 0] ** 2
        score += proj[..., 1] ** 2
        score -= self.penalty[None, :]  # = -(residual + prior), up to a per-voxel constant
        amplitude = centred @ self.pinv_a.T
        np.putmask(score, amplitude <= 0, np.float32(-np.inf))
        best = np.argmax(score, axis=1)
        rows = np.arange(best.size)
        near = score >= (score[rows, best] - np.float32(AMBIGUITY_CHI2 * sigma**2))[:, None]
        height_spread = np.max(amplitude, axis=1, where=near, initial=-np.inf) - np.min(
            amplitude, axis=1, where=near, initial=np.inf
        )
        t_peak = np.broadcast_to((self.theta[:, 0] + self.theta[:, 1]).astype(np.float32), near.shape)
        time_spread = np.max(t_peak, axis=1, where=near, initial=-np.inf) - np.min(
            t_peak, axis=1, where=near, initial=np.inf
        )
        ambiguous = (height_spread > AMBIGUITY_HEIGHT * amplitude[rows, best]) | (time_spread > AMBIGUITY_TIME_S)
        return self.theta[best], ambiguous


def _fit_linear(times: np.ndarray, y: np.ndarray, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(b, A, A r) per voxel for shapes ``theta`` (V, 3) by least squares with r >= 0, and the residuals (V, n).

    The 3 x 3 (and, where r < 0, 2 x 2) normal equations are solved in closed form for all voxels.
    """
    g, rec = _basis(times[None, :], theta[:, :1], theta[:, 1:2], theta[:, 2:3])  # (V, n)
    yt = y.T
    n = float(times.size)
    sg, sr, sgg, sgr, srr = g.sum(1), rec.sum(1), (g * g).sum(1), (g * rec).sum(1), (rec * rec).sum(1)
    sy, sgy, sry = yt.sum(1), (g * yt).sum(1), (rec * yt).sum(1)
    full = _solve3(np.full_like(sg, n), sg, sr, sgg, sgr, srr, sy, sgy, sry)
    det2 = n * sgg - sg * sg
    det2 = np.where(np.abs(det2) > 1e-12 * (n * sgg + 1e-30), det2, np.inf)
    reduced = np.column_stack([(sgg * sy - sg * sgy) / det2, (n * sgy - sg * sy) / det2, np.zeros_like(sg)])
    lin = np.where((full[:, 2] >= 0)[:, None], full, reduced)
    return lin, yt - lin[:, :1] - lin[:, 1:2] * g - lin[:, 2:3] * rec


def _solve3(a00, a01, a02, a11, a12, a22, b0, b1, b2) -> np.ndarray:  # noqa: ANN001
    """Symmetric 3 x 3 systems, one per voxel, by cofactors (a tiny ridge keeps degenerate ones finite)."""
    ridge = (1e-9 if a00.dtype == np.float64 else 1e-6) * (a00 + a11 + a22) + 1e-30
    a00, a11, a22 = a00 + ridge, a11 + ridge, a22 + ridge
    c00 = a11 * a22 - a12 * a12
    c01 = a02 * a12 - a01 * a22
    c02 = a01 * a12 - a02 * a11
    c11 = a00 * a22 - a02 * a02
    c12 = a01 * a02 - a00 * a12
    c22 = a00 * a11 - a01 * a01
    det = a00 * c00 + a01 * c01 + a02 * c02
    det = np.where(np.abs(det) > 0, det, np.inf)
    return np.column_stack(
        [
            (c00 * b0 + c01 * b1 + c02 * b2) / det,
            (c01 * b0 + c11 * b1 + c12 * b2) / det,
            (c02 * b0 + c12 * b1 + c22 * b2) / det,
        ]
    )


def _residual(times: np.ndarray, y: np.ndarray, theta: np.ndarray, sigma: float):
    """Data residuals with the prior's pseudo-residuals appended (V, n + 2), their squared norm, the linear part."""
    lin, res = _fit_linear(times, y, theta)
    full = np.concatenate([res, _prior(theta, sigma)], axis=1)
    return full, (full**2).sum(axis=1), lin


def _clip_theta(theta: np.ndarray, times: np.ndarray) -> np.ndarray:
    out = theta.copy()
    out[:, 1] = np.clip(out[:, 1], *TP_BOUNDS_S)
    out[:, 2] = np.clip(out[:, 2], *ALPHA_BOUNDS)
    out[:, 0] = np.clip(out[:, 0], times[0] - TP_BOUNDS_S[1], times[-1])
    return out


def _refine(times: np.ndarray, y: np.ndarray, theta: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Levenberg-Marquardt on (t0, tp, log alpha) for all voxels at once (finite-difference Jacobian)."""
    steps = np.array([0.05, 0.05, 0.02], dtype=theta.dtype)
    theta = theta.copy()
    res, cost, lin = _residual(times, y, theta, sigma)
    damping = np.full(theta.shape[0], 1e-2, dtype=theta.dtype)
    for _ in range(_LM_ITERATIONS):
        jac = np.empty((*res.shape, 3), dtype=res.dtype)
        for i in range(3):
            moved = theta.copy()
            if i == 2:
                moved[:, 2] *= np.exp(steps[2])
            else:
                moved[:, i] += steps[i]
            jac[..., i] = (_residual(times, y, moved, sigma)[0] - res) / steps[i]
        j0, j1, j2 = jac[..., 0], jac[..., 1], jac[..., 2]
        d0, d1, d2 = (j0 * j0).sum(1), (j1 * j1).sum(1), (j2 * j2).sum(1)
        scale = 1.0 + damping
        delta = -_solve3(
            d0 * scale, (j0 * j1).sum(1), (j0 * j2).sum(1), d1 * scale, (j1 * j2).sum(1), d2 * scale,
            (j0 * res).sum(1), (j1 * res).sum(1), (j2 * res).sum(1),
        )  # fmt: skip
        trial = theta.copy()
        trial[:, :2] += delta[:, :2]
        trial[:, 2] *= np.exp(np.clip(delta[:, 2], -1.0, 1.0))
        trial = _clip_theta(trial, times)
        trial_res, trial_cost, trial_lin = _residual(times, y, trial, sigma)
        better = trial_cost < cost
        theta[better], res[better], cost[better], lin[better] = (
            trial[better],
            trial_res[better],
            trial_cost[better],
            trial_lin[better],
        )
        damping = np.where(better, damping / 3.0, damping * 4.0)
    return theta, lin


def _credible(
    times: np.ndarray,
    y: np.ndarray,
    params: np.ndarray,
    residuals: np.ndarray,
    noise_hu: float,
    max_overshoot: float,
) -> np.ndarray:
    """Which fits to keep (criteria: module docstring)."""
    enh = enhancement(y)
    b, a, ar, t0, tp, alpha = params.T
    t_peak = t0 + tp
    dense = np.arange(times[0], times[-1] + 1e-9, 0.5)
    fitted_peak = (curve(dense, params) - b[:, None]).max(axis=1)
    sampled_peak = (y - b[None, :]).max(axis=0)
    rms = np.sqrt((residuals**2).mean(axis=0))
    worst = np.abs(residuals).max(axis=0)
    return (
        (a > 0)
        & (ar >= 0)
        & (tp / np.sqrt(alpha) >= WIDTH_BOUNDS_S[0])
        & (tp / np.sqrt(alpha) <= WIDTH_BOUNDS_S[1])
        & (t_peak >= times[0])
        & (t_peak <= times[-1])
        & (fitted_peak <= max_overshoot * np.maximum(sampled_peak, 1e-6))
        & (rms <= RMS_TOLERANCE[0] * noise_hu + RMS_TOLERANCE[1] * enh)
        & (worst <= MAX_TOLERANCE[0] * noise_hu + MAX_TOLERANCE[1] * enh)
    )
