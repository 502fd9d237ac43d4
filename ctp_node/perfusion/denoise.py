"""Noise handling of the tissue curves: a model subspace and an edge-preserving (TIPS-like) filter.

CT perfusion at clinical dose has 5-10 HU of noise per voxel and frame, while white matter enhances
by ~10 HU and an ischaemic core by 2-3 HU: voxel curves must be denoised before deconvolution, but
plain Gaussian smoothing mixes grey matter, white matter, lesion, CSF and vessels. Two steps:

1. **Model subspace.** Every physiological tissue curve is ``AIF conv R`` for some residue R (delay
   0-15 s, mean transit time 1-30 s, exponential to box shape). The leading singular vectors of that
   dictionary, for the measured AIF, span them all: ``K`` vectors (9-16 of 60 frames on the phantoms,
   at most ``MAX_COMPONENTS``) keep every atom to within ``SUBSPACE_TOLERANCE`` of its norm.
   Projecting a curve onto them removes the noise outside the subspace (most of it) and leaves ``K``
   coefficients per voxel to filter.
2. **Time-intensity-profile-similarity bilateral filter** (TIPS, Mendrik et al., Radiology 2011):
   each voxel becomes a weighted mean of its in-plane neighbours, with a Gaussian spatial weight
   (``SPATIAL_SIGMA_MM``) times a range weight that falls once the two *curves* differ by more than
   noise can explain. The curve distance is computed on a lightly smoothed guide (``GUIDE_SIGMA_MM``),
   only along the directions in which the curves of the study vary more than noise (the rest would
   drown the difference), and in units of the guide's own noise, which is measured on the data (a
   noise-only image: the difference of two baseline frames; the baseline subtraction's share of the
   noise is known analytically). No threshold is fitted to any study: the scales are physical (mm),
   the noise is measured.

Only parenchyma voxels (not CSF, not vessels) vote, so vessels never bleed into tissue. Vectorised
over voxels: one pass per neighbour offset, on a stencil of ~1 mm spacing whatever the pixel size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import linalg, ndimage

from ctp_node.perfusion import parametric

SUBSPACE_TOLERANCE = 0.05  # worst atom's residual / norm after projection
MAX_COMPONENTS = 16
SPATIAL_SIGMA_MM = 2.0
RADIUS_SIGMAS = 2.0
STENCIL_STEP_MM = 0.9  # neighbours closer than the noise correlation add little: ~1 mm apart
GUIDE_SIGMA_MM = 1.0
NOISE_RANK_RTOL = 1e-6  # noise-covariance eigenvalues below this fraction of the largest: no direction
SIGNAL_VARIANCE = 1.5  # x noise variance: a direction with more variance than this carries signal


@dataclass(frozen=True)
class NoiseEstimate:
    sigma_hu: float  # per voxel and frame
    noise_image: np.ndarray  # (Z, Y, X) a noise-only image with the data's spatial correlation


def estimate_noise(hu: np.ndarray, baseline_frames: np.ndarray, mask: np.ndarray) -> NoiseEstimate:
    """Noise from the pre-contrast frames: (S_b - S_a) / sqrt(2) of two baseline frames is pure noise
    with the data's spatial correlation; its std over ``mask`` is the per-voxel noise. With a single
    baseline frame, the deviation of that frame from its 3 x 3 median stands in (underestimates
    correlated noise slightly)."""
    if len(baseline_frames) >= 2:
        a, b = int(baseline_frames[0]), int(baseline_frames[-1])
        image = (hu[b].astype(np.float32) - hu[a].astype(np.float32)) / np.float32(np.sqrt(2.0))
    else:
        frame = hu[int(baseline_frames[0]) if len(baseline_frames) else 0].astype(np.float32)
        image = frame - ndimage.median_filter(frame, size=(1, 3, 3))
    values = image[mask]
    # Robust std (MAD): a moving patient or a vessel in one frame must not inflate it.
    sigma = float(1.4826 * np.median(np.abs(values - np.median(values)))) if values.size else 0.0
    return NoiseEstimate(sigma_hu=sigma, noise_image=np.where(mask, image, np.float32(0)))


def model_basis(
    grid_s: np.ndarray,
    aif_grid: np.ndarray,
    tolerance: float = SUBSPACE_TOLERANCE,
    acquired_s: np.ndarray | None = None,
) -> np.ndarray:
    """(K, N) orthonormal rows spanning every exponential- and box-residue tissue curve of this AIF
    (sampled at ``acquired_s`` and resampled to the grid like the data, when given)."""
    atoms = np.concatenate(
        [parametric.dictionary(grid_s, aif_grid, family, acquired_s=acquired_s)[0] for family in ("exponential", "box")]
    )
    norms = np.linalg.norm(atoms, axis=1)
    atoms = atoms[norms > 0] / norms[norms > 0, None]
    _, _, vt = np.linalg.svd(atoms, full_matrices=False)
    limit = min(MAX_COMPONENTS, vt.shape[0])
    for k in range(2, limit + 1):
        residual = atoms - (atoms @ vt[:k].T) @ vt[:k]
        if np.linalg.norm(residual, axis=1).max() <= tolerance:
            return vt[:k]
    return vt[:limit]


def coefficient_noise_cov(
    basis: np.ndarray, interp: np.ndarray, baseline_frames: np.ndarray, n_frames: int
) -> np.ndarray:
    """Noise covariance (K, K) of ``basis @ interp @ (S - S0)`` per unit frame noise variance.

    S0, the mean of the baseline frames, is subtracted from every frame: its noise is common to
    the whole curve and dominates the slowly varying components (it is not white in time).
    """
    a = np.eye(n_frames)
    if len(baseline_frames):
        a[:, np.asarray(baseline_frames)] -= 1.0 / len(baseline_frames)
    m = np.asarray(basis, dtype=np.float64) @ np.asarray(interp, dtype=np.float64) @ a
    return m @ m.T


def _masked_gaussian(volume: np.ndarray, weight: np.ndarray, sigma_px: float) -> np.ndarray:
    """In-plane Gaussian of (..., Z, Y, X) normalised to ``weight`` (Z, Y, X)."""
    lead = (0,) * (volume.ndim - 3)
    norm = np.maximum(ndimage.gaussian_filter(weight, (0, sigma_px, sigma_px)), 1e-6)
    return ndimage.gaussian_filter(volume * weight, (*lead, 0, sigma_px, sigma_px)) / norm


@dataclass(frozen=True)
class _RangeSetUp:
    """What both filters share: the parenchyma's bounding box, its coefficients and the range weight's scales."""

    box: tuple[slice, slice, slice]
    coef: np.ndarray  # (K, z, y, x) float32, the box of the coefficients
    mask: np.ndarray  # (z, y, x) bool, the box of the mask
    guide: np.ndarray  # (k, z, y, x) float32: the signal directions, lightly smoothed, unit noise each
    expected: float  # squared guide distance that noise alone gives
    spread: float  # its standard deviation


@dataclass(frozen=True)
class RangeScales:
    """The range weight's data-derived scales, fixed by one study: re-used, a filter of other (e.g. noise-
    injected) coefficients of the same study weighs curve differences exactly as the study's own pass did."""

    signal: np.ndarray  # (K, k) float64: the signal directions, unit noise each
    expected: float  # squared guide distance that noise alone gives
    spread: float  # its standard deviation


def range_scales(
    coefficients: np.ndarray, mask: np.ndarray, noise: NoiseEstimate, pixel_mm: float,
    guide_sigma_mm: float = GUIDE_SIGMA_MM, noise_cov: np.ndarray | None = None,
) -> RangeScales | None:  # fmt: skip
    """The scales ``tips_filter`` derives from (K, Z, Y, X) ``coefficients`` in ``mask``; None where it would
    change nothing (empty mask, no noise measured)."""
    box = _bounding_box(mask)
    if box is None or noise.sigma_hu <= 0:
        return None
    m = mask[box]
    return _scales(coefficients[(slice(None), *box)][:, m], m, noise, box, pixel_mm, guide_sigma_mm, noise_cov)


def _scales(
    values: np.ndarray, m: np.ndarray, noise: NoiseEstimate, box: tuple[slice, slice, slice], pixel_mm: float,
    guide_sigma_mm: float, noise_cov: np.ndarray | None,
) -> RangeScales | None:  # fmt: skip
    weight = m.astype(np.float32)
    # The curve distance is measured in the directions where the curves differ by more than noise:
    # generalised eigenvectors of the coefficients' covariance against their noise covariance
    # (``noise_cov`` x sigma^2) whose variance exceeds SIGNAL_VARIANCE x noise. The other directions
    # carry noise only and would drown the signal difference. Scaled to unit noise per direction.
    values = values.astype(np.float64)
    sigma2 = noise.sigma_hu**2
    cov_n = np.eye(values.shape[0]) if noise_cov is None else np.asarray(noise_cov, dtype=np.float64)
    # Generalised eigenproblem by whitening, in the range of the noise covariance only: a series
    # acquired every 4-8 s has fewer independent samples than the subspace has components, and the
    # directions it cannot reach carry neither noise nor signal (eigh would fail on the singular B).
    noise_val, noise_vec = linalg.eigh(cov_n * sigma2)
    keep = noise_val > NOISE_RANK_RTOL * noise_val.max()
    whiten = noise_vec[:, keep] / np.sqrt(noise_val[keep])  # (K, r)
    eigval, rotation = linalg.eigh(whiten.T @ np.cov(values) @ whiten)
    eigvec = whiten @ rotation
    signal = eigvec[:, eigval > SIGNAL_VARIANCE]
    if signal.shape[1] < 2:
        signal = eigvec[:, -2:]
    k = signal.shape[1]
    # Each feature has unit noise variance; smoothing shrinks it by the factor measured on a
    # noise-only image with the data's spatial correlation. (A ``guide_source`` keeps this scale: its
    # noise is below that of the guide_sigma_mm Gaussian, so the range weight is never stricter.)
    noise_guide = _masked_gaussian(noise.noise_image[box], weight, guide_sigma_mm / pixel_mm)
    sigma_guide2 = float(np.mean(noise_guide[m] ** 2)) / sigma2 if m.any() else 0.0
    if sigma_guide2 <= 0:
        return None
    # The range weight: 1 while the squared guide distance is within what noise gives (2 sigma^2 per
    # direction, k of them), then falling by e per standard deviation of that noise distance.
    expected = 2.0 * sigma_guide2 * k
    spread = 2.0 * sigma_guide2 * np.sqrt(2.0 * k)
    return RangeScales(signal=signal, expected=expected, spread=spread)


def _range_set_up(
    coefficients: np.ndarray, mask: np.ndarray, noise: NoiseEstimate, pixel_mm: float, guide_sigma_mm: float,
    noise_cov: np.ndarray | None, guide_source: np.ndarray | None = None, scales: RangeScales | None = None,
) -> _RangeSetUp | None:  # fmt: skip
    box = _bounding_box(mask)
    if box is None or noise.sigma_hu <= 0:
        return None
    coef = np.ascontiguousarray(coefficients[(slice(None), *box)], dtype=np.float32)
    m = mask[box]
    weight = m.astype(np.float32)
    if scales is None:
        scales = _scales(coef[:, m], m, noise, box, pixel_mm, guide_sigma_mm, noise_cov)
        if scales is None:
            return None
    signal = scales.signal.T.astype(np.float32)
    if guide_source is None:
        features = np.tensordot(signal, coef, axes=1)
        guide = _masked_gaussian(features, weight, guide_sigma_mm / pixel_mm).astype(np.float32) * weight
    else:
        source = np.ascontiguousarray(guide_source[(slice(None), *box)], dtype=np.float32)
        guide = np.tensordot(signal, source, axes=1) * weight
    return _RangeSetUp(box=box, coef=coef, mask=m, guide=guide, expected=scales.expected, spread=scales.spread)


def _stencil(pixel_mm: float, spatial_sigma_mm: float, step_mm: float) -> tuple[int, list[tuple[int, int, float]]]:
    """(radius in pixels, [(dy, dx, spatial weight)]) of the in-plane neighbours within RADIUS_SIGMAS sigmas."""
    step = max(1, int(round(step_mm / pixel_mm)))
    radius = int(np.ceil(RADIUS_SIGMAS * spatial_sigma_mm / pixel_mm / step)) * step
    offsets = []
    for dy in range(-radius, radius + 1, step):
        for dx in range(-radius, radius + 1, step):
            r2 = (dy * dy + dx * dx) * pixel_mm**2
            if r2 <= (RADIUS_SIGMAS * spatial_sigma_mm) ** 2 + 1e-9:
                offsets.append((dy, dx, float(np.exp(-0.5 * r2 / spatial_sigma_mm**2))))
    return radius, offsets


def tips_filter(
    coefficients: np.ndarray,
    mask: np.ndarray,
    noise: NoiseEstimate,
    pixel_mm: float,
    spatial_sigma_mm: float = SPATIAL_SIGMA_MM,
    guide_sigma_mm: float = GUIDE_SIGMA_MM,
    noise_cov: np.ndarray | None = None,
    overwrite: bool = False,
    scales: RangeScales | None = None,
) -> np.ndarray:
    """Edge-preserving in-plane filter of (K, Z, Y, X) curve coefficients inside ``mask`` (Z, Y, X).

    ``noise_cov`` (K, K): covariance of the coefficients' noise in units of the per-frame noise
    variance (identity if None). Returns the filtered coefficients (outside ``mask`` unchanged);
    ``overwrite``: written into ``coefficients`` itself (no second full-size copy: 256 MB at 512 x 512).
    ``scales``: the range weight's scales from another call (``range_scales``) instead of these coefficients'.
    """
    setup = _range_set_up(coefficients, mask, noise, pixel_mm, guide_sigma_mm, noise_cov, scales=scales)
    if setup is None:
        return coefficients
    coef, m, guide = setup.coef, setup.mask, setup.guide
    weight = m.astype(np.float32)
    k = guide.shape[0]
    radius, offsets = _stencil(pixel_mm, spatial_sigma_mm, STENCIL_STEP_MM)
    pad = ((0, 0), (0, 0), (radius, radius), (radius, radius))
    coef_p = np.pad(coef, pad)
    guide_p = np.pad(guide, pad)
    weight_p = np.pad(weight, pad[1:])
    ny, nx = m.shape[1:]
    acc = np.zeros_like(coef)
    total = np.zeros(m.shape, dtype=np.float32)
    d2 = np.empty(m.shape, dtype=np.float32)
    tmp = np.empty(m.shape, dtype=np.float32)
    n_coef = coef.shape[0]
    for dy, dx, spatial in offsets:
        ys, xs = slice(radius + dy, radius + dy + ny), slice(radius + dx, radius + dx + nx)
        d2.fill(0.0)
        for c in range(k):
            np.subtract(guide[c], guide_p[c, :, ys, xs], out=tmp)
            np.square(tmp, out=tmp)
            d2 += tmp
        # w = spatial * exp(-max(d2 - expected, 0) / spread) * neighbour in mask
        np.subtract(d2, np.float32(setup.expected), out=d2)
        np.maximum(d2, 0.0, out=d2)
        np.multiply(d2, np.float32(-1.0 / setup.spread), out=d2)
        np.exp(d2, out=d2)
        d2 *= np.float32(spatial)
        d2 *= weight_p[:, ys, xs]
        total += d2
        for c in range(n_coef):
            np.multiply(coef_p[c, :, ys, xs], d2, out=tmp)
            acc[c] += tmp
    out = coefficients if overwrite else coefficients.copy()
    filtered = np.divide(acc, np.maximum(total, 1e-12), out=acc)  # in place: acc is not used again
    region = out[(slice(None), *setup.box)]
    region[:, m] = filtered[:, m]
    return out


def tips_filter_at(
    coefficients: np.ndarray,
    mask: np.ndarray,
    targets: np.ndarray,
    noise: NoiseEstimate,
    pixel_mm: float,
    spatial_sigma_mm: float,
    guide_sigma_mm: float = GUIDE_SIGMA_MM,
    noise_cov: np.ndarray | None = None,
    step_mm: float = STENCIL_STEP_MM,
    guide_source: np.ndarray | None = None,
    scales: RangeScales | None = None,
) -> np.ndarray | None:
    """``tips_filter`` evaluated at ``targets`` only (flat indices of voxels of ``mask``): (K, n) float32.

    The same range weight (same guide, same noise scales), any spatial sigma, on a stencil ``step_mm``
    apart; the cost grows with the targets, not the image, so a wide neighbourhood for a few voxels
    is cheap. None where ``tips_filter`` would change nothing (no mask, no noise measured).

    ``guide_source`` (K, Z, Y, X): coefficients to compute the guide from, as they are, instead of
    ``coefficients`` smoothed over ``guide_sigma_mm`` (a first pass's output: tissues whose curves differ
    are told apart more surely); the range weight keeps the noise scale of that Gaussian. ``scales``: as in
    ``tips_filter``."""
    targets = np.asarray(targets, dtype=np.int64)
    if targets.size and (targets.min() < 0 or targets.max() >= mask.size or not mask.reshape(-1)[targets].all()):
        raise ValueError("tips_filter_at: every target must lie inside the mask")
    setup = _range_set_up(coefficients, mask, noise, pixel_mm, guide_sigma_mm, noise_cov, guide_source, scales)
    if setup is None:
        return None
    z, y, x = np.unravel_index(targets, mask.shape)
    box = setup.box
    z, y, x = z - box[0].start, y - box[1].start, x - box[2].start
    radius, offsets = _stencil(pixel_mm, spatial_sigma_mm, step_mm)
    k, n_coef = setup.guide.shape[0], setup.coef.shape[0]
    # Only the targets' slices and in-plane box, widened by the stencil's radius, hold neighbours: a small
    # lesion on a 512 x 512 study needs a few MB, not the whole parenchyma's rows.
    ny, nx = setup.mask.shape[1:]
    y0, x0 = max(int(y.min()) - radius, 0), max(int(x.min()) - radius, 0)
    crop = (
        slice(int(z.min()), int(z.max()) + 1),
        slice(y0, min(int(y.max()) + radius + 1, ny)),
        slice(x0, min(int(x.max()) + radius + 1, nx)),
    )
    z, y, x = z - crop[0].start, y - y0, x - x0
    mask_crop = setup.mask[crop]
    # One row per voxel (padded in-plane) holding its guide, its coefficients and its mask weight: a
    # neighbour is one contiguous row to gather.
    pad = ((0, 0), (radius, radius), (radius, radius))
    rows = np.concatenate(
        [np.pad(setup.guide[(slice(None), *crop)], ((0, 0), *pad)),
         np.pad(setup.coef[(slice(None), *crop)], ((0, 0), *pad)),
         np.pad(mask_crop.astype(np.float32), pad)[None]],
        axis=0,
    ).reshape(k + n_coef + 1, -1).T.copy()  # fmt: skip
    padded_shape = (mask_crop.shape[0], mask_crop.shape[1] + 2 * radius, mask_crop.shape[2] + 2 * radius)
    centre = np.ravel_multi_index((z, y + radius, x + radius), padded_shape)
    own = rows[centre, :k]
    acc = np.zeros((centre.size, n_coef), dtype=np.float32)
    total = np.zeros(centre.size, dtype=np.float32)
    for dy, dx, spatial in offsets:
        neighbour = rows[centre + dy * padded_shape[2] + dx]
        d2 = np.square(own - neighbour[:, :k]).sum(axis=1)
        w = np.exp(-np.maximum(d2 - setup.expected, 0.0) / setup.spread) * np.float32(spatial) * neighbour[:, -1]
        total += w
        acc += neighbour[:, k : k + n_coef] * w[:, None]
    return (acc / np.maximum(total, 1e-12)[:, None]).T


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    if not mask.any():
        return None
    return tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(mask))  # type: ignore[return-value]


def median_window(window_mm: float, pixel_mm: float) -> int:
    """The odd in-plane window (pixels, at least 3) nearest to ``window_mm``; 0 when ``window_mm`` is 0."""
    if window_mm <= 0:
        return 0
    return max(3, 2 * int(round((window_mm / pixel_mm - 1.0) / 2.0)) + 1)


def median_in_mask(volume: np.ndarray, mask: np.ndarray, size: int) -> np.ndarray:
    """In-plane ``size`` x ``size`` median of ``volume`` (Z, Y, X) over the voxels of ``mask`` only.

    Voxels outside ``mask`` neither vote nor change: a parameter map is filtered within the tissue
    it is defined in, and a step between two tissues stays where it is (a median never moves an
    edge, unlike a mean)."""
    out = np.array(volume, dtype=np.float32, copy=True)
    if size < 3:
        return out
    half = size // 2
    outside_is_nan = np.where(mask, out, np.float32(np.nan))
    padded = np.pad(outside_is_nan, ((0, 0), (half, half), (half, half)), constant_values=np.nan)
    for z in range(out.shape[0]):
        rows, cols = np.nonzero(mask[z])
        if rows.size == 0:
            continue
        windows = np.lib.stride_tricks.sliding_window_view(padded[z], (size, size))  # (Y, X, size, size) view
        for start in range(0, rows.size, 65536):  # bounded memory on 512 x 512 slices
            r, c = rows[start : start + 65536], cols[start : start + 65536]
            out[z, r, c] = np.nanmedian(windows[r, c].reshape(r.size, -1), axis=1)
    return out
