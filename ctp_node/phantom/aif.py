"""The arterial input function (AIF) of the phantom and the curves of its larger vessels.

The AIF is that of the digital phantom in docs/ctp-data.md, given as HU above baseline at
t = 1, 3, ..., 49 s. We represent it as a smooth analytic curve (two gamma variates for the first
pass, whose shape is more symmetric than one gamma variate allows, plus a broad gamma variate for
recirculation; fitted by least squares, RMS 7 HU) and add a monotone cubic (PCHIP) interpolation of
the fit's residuals, so the curve passes through every listed sample (including the second pass near
33 s), is C1-smooth, and beyond the last sample relaxes to the analytic washout within ~5 s.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.interpolate import PchipInterpolator

AIF_SAMPLE_TIMES_S = np.arange(1.0, 50.0, 2.0)
AIF_SAMPLES_HU = np.array(
    [0, 0, 0, 0, 25, 105, 220, 350, 440, 485, 430, 300, 180, 110,
     104, 108, 115, 125, 115, 108, 98, 90, 98, 108, 112],
    dtype=np.float64,
)  # fmt: skip
WASHOUT_TAPER_S = 5.0  # how fast the sample-matching correction fades after the last sample


@dataclass(frozen=True)
class GammaVariate:
    """``peak_hu * (s / (alpha beta))**alpha * exp(alpha - s / beta)``, s = t - onset_s >= 0.

    Normalised so that its maximum, at s = alpha * beta, equals ``peak_hu``.
    """

    peak_hu: float
    onset_s: float
    alpha: float
    beta: float

    def __call__(self, t: np.ndarray) -> np.ndarray:
        s = np.asarray(t, dtype=np.float64) - self.onset_s
        pos = np.clip(s, 1e-12, None)
        value = self.peak_hu * np.exp(
            self.alpha * np.log(pos / (self.alpha * self.beta)) + self.alpha - pos / self.beta
        )
        return np.where(s > 0, value, 0.0)


FIRST_PASS = (
    GammaVariate(peak_hu=327.19196, onset_s=0.0, alpha=19.780019, beta=0.80335425),
    GammaVariate(peak_hu=241.08209, onset_s=3.3241598, alpha=39.999553, beta=0.42543370),
)
RECIRCULATION = GammaVariate(peak_hu=110.57418, onset_s=12.814126, alpha=1.5, beta=16.703145)


def analytic_aif(t: np.ndarray) -> np.ndarray:
    """The fitted gamma-variate first pass plus recirculation (HU above baseline)."""
    t = np.asarray(t, dtype=np.float64)
    return FIRST_PASS[0](t) + FIRST_PASS[1](t) + RECIRCULATION(t)


def _residual_interpolator() -> PchipInterpolator:
    knots = np.concatenate([[0.0], AIF_SAMPLE_TIMES_S])
    values = np.concatenate([[0.0], AIF_SAMPLES_HU]) - analytic_aif(knots)
    return PchipInterpolator(knots, values, extrapolate=False)


_RESIDUAL = _residual_interpolator()


def reference_aif(t: np.ndarray) -> np.ndarray:
    """HU above baseline of the phantom's AIF at times ``t`` (s since the start of the scan).

    Exactly the listed samples at t = 1, 3, ..., 49 s; smooth in between; zero before injection.
    """
    t = np.asarray(t, dtype=np.float64)
    last = AIF_SAMPLE_TIMES_S[-1]
    inside = np.nan_to_num(_RESIDUAL(np.clip(t, 0.0, last)))
    end_residual = float(_RESIDUAL(last))
    correction = np.where(t <= last, inside, end_residual * np.exp(-(t - last) / WASHOUT_TAPER_S))
    return np.clip(analytic_aif(t) + correction, 0.0, None) * (t >= 0)


def delayed_dispersed(curve: np.ndarray, dt_s: float, delay_s: float, dispersion_s: float) -> np.ndarray:
    """A vessel curve downstream of ``curve`` (sampled every ``dt_s`` from t = 0).

    Shifts by ``delay_s`` and convolves with a unit-area exponential of mean ``dispersion_s``
    (transit through a vascular bed), so the area under the curve, i.e. the amount of contrast
    agent, is conserved: a venous sinus peaks later, lower and broader than the artery.
    """
    n = curve.size
    shift = int(round(delay_s / dt_s))
    out = np.zeros(n)
    if shift < n:
        out[shift:] = curve[: n - shift]
    if dispersion_s > 0:
        kernel = np.exp(-np.arange(n) * dt_s / dispersion_s)
        kernel /= kernel.sum()
        out = np.fft.irfft(np.fft.rfft(out, 2 * n) * np.fft.rfft(kernel, 2 * n), 2 * n)[:n]
    return out
