"""How far each low-flow voxel's CBF, and the core volume, could move under the study's own noise.

Why: the core is a threshold (rCBF < 0.3) on a map whose low-flow voxels enhance by 1-3 HU at 5-10 HU of
noise. Whether a stated core volume is a measurement or partly a coin toss at the threshold is something
the study itself can say: its noise is measured, and the analysis can be repeated under more of it.

How (a parametric bootstrap, e.g. Efron and Tibshirani 1993, ch. 6): data drawn from the fitted model at the
study's noise level. The study's filtered curve coefficients (its estimate of the noise-free curves) get
``REPLICATES`` fresh noise realisations with the noise the study itself shows: its per-frame level and its
in-plane texture (both measured on the difference of two baseline frames, ``denoise.estimate_noise``; CT noise
is correlated by the reconstruction kernel, and white noise would average away in the filter far faster than
the real one) and its temporal structure after baseline subtraction (``denoise.coefficient_noise_cov``). Each
replicate goes through the study's own steps: the TIPS filter on the study's range scales, the dictionary fit
with the study's residue shape (each voxel's baseline from the frames the study's first pass chose), the MTT
median, CBV = area / AIF area and CBF = CBV / MTT (with no noise added and from the unfiltered curves, a
replicate repeats the study's CBF exactly: tests). Evaluated only where a core can form: tissue whose flow is
below ``BAND_RCBF`` of the reference (after the masks' majority vote) and a voxel around it, plus the
neighbours its MTT median reads.

Two outputs:

- ``CbfSpread.sd``, a per-voxel map: the replicates' robust spread (median absolute deviation, pooled over
  3 x 3 in-plane neighbours). Robust because CBF = CBV / MTT has a heavy upper tail where a noisy fit's MTT
  comes out short; on the analytic head (tests) the replicates' standard deviation overstated the spread
  across independent noise draws 1.3-1.7-fold, the robust spread matched it (1.0-1.15).
- The core volume's 95 % range over the replicates (the lesion rule and its cleaning on each replicate's CBF;
  measured -+ 1.96 sd of the replicates' volumes), and, counted apart, the core voxels whose own 95 %
  interval reaches the threshold (per voxel the reading could go either way; the volume, which pools
  voxels through the majority vote, varies far less).

A third, behind a setting that is off by default (``PerfusionSettings.noise_bias_correction``): what the noise
adds on average. One more pass with no noise added is the baseline; the replicates' mean CBF less it, per
low-flow voxel (``CbfSpread.bias``), and the replicates' median less its median over a sample of the rCBF
reference tissue (``median_shift`` over a ``reference_sample``: that median sits in white matter's upper tail,
where noise moves it). Where the residue model fits the estimates follow what the noise does on the phantoms;
the core volumes were no better for taking them off (docs/benchmarks.md, "measured, not adopted").

What it does not capture: bias other than the noise's. A systematic error (the truncation of a slow curve by
the end of the acquisition, a wrong residue shape, a filter that mixes a small core with its rim) moves every
replicate alike. docs/benchmarks.md states, per phantom family, the range next to the core's actual error: on the
phantoms the noise moves the core by 1-2 mL while its error is up to 10 mL, so the range says how much of a
volume is noise, not how far it is from the truth. Deterministic: the noise comes from a fixed seed, so the
same series gives the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import fft as sp_fft
from scipy import ndimage

from ctp_node.perfusion import denoise, parametric
from ctp_node.perfusion.low_flow import UnfilteredCurves

REPLICATES = 4
BAND_RCBF = 0.6  # of the reference flow: below it, a voxel's CBF spread is estimated
Z_INTERVAL = 1.96  # per voxel, two-sided 95 %
SEED = 20240806  # fixed: the same series gives the same range
KERNEL_RADIUS_MM = 4.0  # the noise texture's correlation is measured out to this lag
POOL_SIZE = 3  # in-plane window over which a voxel's replicate variance is pooled
REFERENCE_SAMPLE = 2000  # normal-tissue voxels the reference's shift under noise is measured on
# A larger shift is not taken off: the replicates would be saying the reference is mostly noise.
MAX_REFERENCE_SHIFT = 0.5


@dataclass(frozen=True)
class CbfSpread:
    """Per target voxel (flat indices ``targets`` into the volume): CBF's spread over the replicates."""

    targets: np.ndarray  # (n,) int64
    sd: np.ndarray  # (n,) mL/100 g/min, robust (``_robust_sd``), pooled over POOL_SIZE x POOL_SIZE neighbours
    replicates: int
    values: np.ndarray  # (replicates, n) each replicate's CBF
    # With ``cbf_spread(noise_free_pass=True)``, else None: (n,) the replicate with no noise added (the same
    # steps on the study's filtered curves), what the noise is measured against; and what the noise adds to
    # each voxel's CBF on average (replicates' mean less it, median-pooled over POOL_SIZE x POOL_SIZE
    # neighbours, ``_pooled``).
    noise_free: np.ndarray | None = None
    bias: np.ndarray | None = None


def noise_kernel(noise_image: np.ndarray, mask: np.ndarray, pixel_mm: float) -> np.ndarray:
    """(2 r + 1, 2 r + 1) in-plane kernel h: white unit noise convolved with h has unit variance and the
    spatial correlation of ``noise_image`` within ``mask`` (Z, Y, X), measured out to ``KERNEL_RADIUS_MM``.

    The autocorrelation is measured over the mask's pairs of voxels only (outside the mask the image is
    not noise); the kernel is the inverse transform of the square root of the spectrum it implies."""
    r = max(1, int(np.ceil(KERNEL_RADIUS_MM / pixel_mm)))
    shape = (mask.shape[1] + 2 * r, mask.shape[2] + 2 * r)
    products = np.zeros(shape)
    pairs = np.zeros(shape)
    for z in range(mask.shape[0]):
        if not mask[z].any():
            continue
        values = np.where(mask[z], noise_image[z], 0.0).astype(np.float64)
        spectrum = np.fft.rfft2(values, shape)
        products += np.fft.irfft2(spectrum * np.conj(spectrum), shape)
        inside = np.fft.rfft2(mask[z].astype(np.float64), shape)
        pairs += np.fft.irfft2(inside * np.conj(inside), shape)
    lags = np.r_[0 : r + 1, -r:0]
    window = np.ix_(lags, lags)
    with np.errstate(divide="ignore", invalid="ignore"):
        acf = np.where(np.rint(pairs[window]) > 0, products[window] / pairs[window], 0.0)
    if not acf[0, 0] > 0:
        centre = np.zeros((2 * r + 1, 2 * r + 1))
        centre[r, r] = 1.0
        return centre
    size = 8 * (2 * r + 1)  # the spectrum on a finer frequency grid than the kernel's support
    padded = np.zeros((size, size))
    padded[np.ix_(np.r_[0 : r + 1, size - r : size], np.r_[0 : r + 1, size - r : size])] = acf / acf[0, 0]
    nps = np.maximum(np.fft.fft2(padded).real, 0.0)
    kernel = np.fft.fftshift(np.fft.ifft2(np.sqrt(nps)).real)
    c = size // 2
    kernel = kernel[c - r : c + r + 1, c - r : c + r + 1]
    return kernel / np.sqrt(np.sum(kernel**2))


def correlated_noise(
    rng: np.random.Generator, shape: tuple[int, ...], kernel: np.ndarray, count: int = 1
) -> list[np.ndarray]:
    """``count`` independent unit-variance Gaussian fields of ``shape`` (..., Y, X), correlated in-plane by
    ``kernel``, float32. One convolution for all: the fields are windows (views: on this VM a copy of a crop's
    fields cost more than the convolution that made them) of one taller field whose starts lie a kernel's width
    apart, so no two share a white-noise sample."""
    r = kernel.shape[0] // 2
    step = 2 * r + 1
    rows = shape[-2] + step * (count - 1)
    padded = (rows + 2 * r, shape[-1] + 2 * r)
    white = rng.standard_normal((*shape[:-2], *padded), dtype=np.float32)
    # Circular convolution on the padded plane, kept where it equals the linear one (float32 throughout).
    size = (sp_fft.next_fast_len(padded[0], real=True), sp_fft.next_fast_len(padded[1], real=True))
    spectrum = sp_fft.rfft2(white, s=size, axes=(-2, -1))
    spectrum *= sp_fft.rfft2(kernel[::-1, ::-1].astype(np.float32), s=size)
    tall = sp_fft.irfft2(spectrum, s=size, axes=(-2, -1))[..., 2 * r : 2 * r + rows, 2 * r : 2 * r + shape[-1]]
    return [tall[..., i * step : i * step + shape[-2], :] for i in range(count)]


def cbf_spread(
    curves: UnfilteredCurves,
    targets: np.ndarray,
    fitted_region: np.ndarray,
    study: parametric.StudyFit,
    k: float,
    median_size: int,
    first_tmax_s: np.ndarray,
    replicates: int = REPLICATES,
    seed: int = SEED,
    noise_scale: float = 1.0,
    from_filtered: bool = True,
    noise_free_pass: bool = False,
) -> CbfSpread | None:
    """CBF of ``targets`` (flat indices into the volume) over ``replicates`` noise-injected copies of the study
    (module doc). ``fitted_region`` (Z, Y, X) bool: the parenchyma the study's fit and MTT median ran on;
    ``study``: how it was fitted.
    ``median_size``: the MTT median's window (pixels; < 3: none). ``first_tmax_s`` (Z, Y, X): the study fit's
    first-pass delays (``ResidueStats.first_tmax_s``), which place each voxel's baseline in every replicate.
    ``noise_scale``: of the study's noise (0: the study's own analysis, repeated; for tests).
    ``from_filtered``: the replicates are the study's filtered curves plus noise (the parametric bootstrap: data
    drawn from the fitted model at the study's noise level); False: its unfiltered curves plus noise (for
    tests). ``noise_free_pass``: one more pass with no noise added (``CbfSpread.noise_free`` and ``bias``).
    None: no targets or no noise."""
    targets = np.asarray(targets, dtype=np.int64)
    shape = fitted_region.shape
    scales = curves.scales
    if targets.size == 0 or curves.noise.sigma_hu <= 0 or replicates < 1 or scales is None:
        return None
    target_mask = np.zeros(shape, dtype=bool)
    target_mask.reshape(-1)[targets] = True
    half = median_size // 2 if median_size >= 3 else 0
    # The voxels whose fit the targets' MTT median reads.
    evaluated = fitted_region & ndimage.binary_dilation(target_mask, np.ones((1, 2 * half + 1, 2 * half + 1), bool))
    # Widened by the filter's stencil and the guide's smoothing, the crop holds every curve they read.
    margin = int(np.ceil(denoise.RADIUS_SIGMAS * denoise.SPATIAL_SIGMA_MM / curves.pixel_mm))
    margin += int(np.ceil(4.0 * denoise.GUIDE_SIGMA_MM / curves.pixel_mm)) + 1
    zs, ys, xs = np.nonzero(evaluated)
    crop = (
        slice(int(zs.min()), int(zs.max()) + 1),
        slice(max(int(ys.min()) - margin, 0), min(int(ys.max()) + margin + 1, shape[1])),
        slice(max(int(xs.min()) - margin, 0), min(int(xs.max()) + margin + 1, shape[2])),
    )
    mask = curves.mask[crop]
    source = curves.filtered if from_filtered else curves.coefficients
    coef = np.ascontiguousarray(source[(slice(None), *crop)], dtype=np.float32)
    noise = denoise.NoiseEstimate(sigma_hu=curves.noise.sigma_hu, noise_image=curves.noise.noise_image[crop])
    kernel = noise_kernel(curves.noise.noise_image, curves.mask, curves.pixel_mm)
    vals, vecs = np.linalg.eigh(np.asarray(curves.noise_cov, dtype=np.float64))
    mixing = (vecs * np.sqrt(np.maximum(vals, 0.0))).astype(np.float32)  # (K, K): mixing @ mixing.T = noise_cov
    sigma = np.float32(curves.noise.sigma_hu * noise_scale)
    local_eval = evaluated[crop]
    rows = np.flatnonzero(local_eval)  # flat indices in the crop
    first_tmax = np.asarray(first_tmax_s)[crop].reshape(-1)[rows]
    z, y, x = np.unravel_index(targets, shape)
    local_targets = np.ravel_multi_index((z - crop[0].start, y - crop[1].start, x - crop[2].start), mask.shape)
    area_scale = k * 100.0 / float(np.sum(study.aif_grid))
    rng = np.random.default_rng(seed)
    fields = correlated_noise(rng, coef.shape, kernel, replicates) if noise_scale > 0 else None
    # With ``noise_free_pass``, one more pass after the replicates: the same steps with no noise added.
    passes = replicates + int(noise_free_pass)
    values = np.empty((passes, targets.size), dtype=np.float64)
    noisy = np.empty_like(coef)  # one buffer for every replicate
    outside = ~mask
    for r in range(passes):
        if fields is not None and r < replicates:
            np.einsum("kl,l...->k...", mixing, fields[r], out=noisy)
            noisy *= sigma
            noisy += coef
        else:
            noisy[...] = coef
        noisy[:, outside] = 0.0
        # The study's filter evaluated at the fitted voxels only (the crop's other voxels are neighbours).
        filtered = denoise.tips_filter_at(
            noisy, mask, rows, noise, curves.pixel_mm, denoise.SPATIAL_SIGMA_MM, noise_cov=curves.noise_cov,
            scales=scales,
        )  # fmt: skip
        flat = filtered.T @ curves.basis  # (m, N) curves
        stats, mtt = study.refit(flat, curves.basis, first_tmax)
        mtt_volume = np.zeros(mask.shape, dtype=np.float32)
        mtt_volume.reshape(-1)[rows] = mtt
        if half:
            mtt_volume = np.where(mtt_volume > 0, denoise.median_in_mask(mtt_volume, mtt_volume > 0, median_size), 0)
        area = np.zeros(mask.size)
        area[rows] = flat.sum(axis=1, dtype=np.float64) - stats.offset_hu * flat.shape[1]
        mtt_t = mtt_volume.reshape(-1)[local_targets].astype(np.float64)
        cbv = area[local_targets] * area_scale
        values[r] = np.where(mtt_t > 0, np.maximum(cbv, 0.0) / np.where(mtt_t > 0, mtt_t, 1.0) * 60.0, 0.0)
    noisy_values = values[:replicates]
    noise_free = values[replicates] if noise_free_pass else None
    bias = None if noise_free is None else _pooled(noisy_values.mean(axis=0) - noise_free, target_mask, targets)
    return CbfSpread(
        targets=targets, sd=_robust_sd(noisy_values, target_mask, targets), replicates=replicates,
        values=noisy_values, noise_free=noise_free, bias=bias,
    )  # fmt: skip


def reference_sample(
    reference: np.ndarray, fitted_region: np.ndarray, seed: int = SEED, sample: int = REFERENCE_SAMPLE
) -> np.ndarray:
    """A fixed random ``sample`` (sorted flat indices) of the fitted voxels of ``reference`` (Z, Y, X) bool, the
    normal tissue the rCBF reference is the median of: the median of a few thousand voxels is within a few
    tenths of a percent of the region's, and the replicates cost what their voxels cost."""
    pool = np.flatnonzero(reference & fitted_region)
    if pool.size == 0:
        return pool
    return np.sort(np.random.default_rng(seed).choice(pool, min(sample, pool.size), replace=False))


def median_shift(spread: CbfSpread) -> float:
    """How far the noise moves the median CBF of ``spread``'s targets: the replicates' medians, averaged, less
    the noise-free pass's median (module doc; ``spread`` from ``cbf_spread(noise_free_pass=True)``)."""
    if spread.noise_free is None:
        raise ValueError("median_shift needs the noise-free pass: cbf_spread(..., noise_free_pass=True)")
    return float(np.mean(np.median(spread.values, axis=1)) - np.median(spread.noise_free))


def _pooled(per_voxel: np.ndarray, target_mask: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``per_voxel`` (n,) at ``targets``, median-filtered over the in-plane ``POOL_SIZE`` neighbours among the
    targets: four replicates say little about one voxel, nine voxels' worth say more."""
    volume = np.zeros(target_mask.shape, dtype=np.float32)
    volume.reshape(-1)[targets] = per_voxel
    return denoise.median_in_mask(volume, target_mask, POOL_SIZE).reshape(-1)[targets].astype(np.float64)


def _robust_sd(values: np.ndarray, target_mask: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Each target's spread over its replicates (R, n), robustly: 1.4826 x the median absolute deviation from
    the replicates' median, the per-voxel deviations' median taken again over the in-plane ``POOL_SIZE``
    neighbours among the targets. Robust because CBF = CBV / MTT has a heavy upper tail where a noisy fit's
    MTT comes out short: on the analytic head (tests) the replicates' standard deviation overstated the spread
    across independent noise draws 1.3-1.7-fold, their robust spread by about 1.15-fold; whether a voxel's flow
    could cross the core threshold is a question about its central spread."""
    if values.shape[0] < 2:
        return np.zeros(targets.size)
    deviation = np.median(np.abs(values - np.median(values, axis=0)), axis=0)
    return 1.4826 * _pooled(deviation, target_mask, targets)
