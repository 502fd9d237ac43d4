"""The published training tuples of one 1 s sequence, and how often each is drawn.

For a sequence of ``T`` volumes (seconds 0..T-1) the published trainer uses every start ``l``, every
gap ``G`` from 2 to ``max_tr`` with ``r = l + G <= T - 1``, and every target ``t`` strictly between:
``l < t < r``. Each tuple carries the conditioning the network sees at inference
(`model.planner.local_context`, `model.planner.contrast_scenario`), with the peak taken as in
training: the argmax over time of the per-volume voxel sum.

Gap weights: by default every tuple is equally likely (the published uniform-over-tuples draw). A
gap of ``G`` seconds has ``G - 1`` targets per start, so long gaps already dominate; to change that,
``gap_weights={G: w}`` multiplies the probability of every tuple with gap ``G`` by ``w`` (gaps not
listed keep 1.0, 0 excludes a gap). The share of gap ``G`` is then proportional to ``w_G * n_G`` with
``n_G`` its number of tuples; :func:`gap_shares` says what a choice of weights gives.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from model.planner import PUBLISHED_MAX_TR, contrast_scenario, local_context, scenario_one_hot

MIN_GAP = 2


@dataclass(frozen=True)
class TrainingSample:
    """One published training tuple: seconds of the known pair and of the target, and its conditioning."""

    left: int
    target: int
    right: int
    local_context: tuple[float, float]
    scenario: int

    @property
    def gap(self) -> int:
        return self.right - self.left

    @property
    def global_context(self) -> tuple[float, float, float]:
        """The one-hot contrast scenario (rising, around peak, falling), as at inference."""
        return scenario_one_hot(self.scenario)


def training_peak(frame_sums: Sequence[float] | np.ndarray) -> int:
    """The training peak: argmax over time of the per-volume voxel sum (first one on ties)."""
    sums = np.asarray(frame_sums, dtype=np.float64)
    if sums.ndim != 1 or sums.size == 0:
        raise ValueError(f"frame_sums must be a non-empty 1-D sequence, got shape {sums.shape}")
    return int(np.argmax(sums))


def enumerate_samples(num_frames: int, peak: int, max_tr: int = PUBLISHED_MAX_TR) -> tuple[TrainingSample, ...]:
    """Every published tuple of a ``num_frames`` long 1 s sequence whose peak is at second ``peak``.

    Ordered by start, then gap, then target.
    """
    if max_tr < 3:
        raise ValueError(f"max_tr must be >= 3 (the local context divides by max_tr - 2), got {max_tr}")
    if not 0 <= peak < num_frames:
        raise ValueError(f"peak {peak} is outside the sequence's seconds 0..{num_frames - 1}")
    samples = []
    for left in range(num_frames):
        for gap in range(MIN_GAP, max_tr + 1):
            right = left + gap
            if right > num_frames - 1:
                break
            scenario = contrast_scenario(left, right, peak)
            for target in range(left + 1, right):
                samples.append(
                    TrainingSample(left, target, right, local_context(target, left, right, max_tr), scenario)
                )
    return tuple(samples)


def validate_gap_weights(gap_weights: Mapping[int, float], max_tr: int = PUBLISHED_MAX_TR) -> None:
    """Gaps must lie in 2..max_tr, weights be finite and >= 0, and at least one gap stay drawable."""
    bad_gaps = sorted(g for g in gap_weights if not MIN_GAP <= int(g) <= max_tr)
    if bad_gaps:
        raise ValueError(f"gap_weights names gaps {bad_gaps} outside the trained range {MIN_GAP}..{max_tr} s")
    bad_values = {g: w for g, w in gap_weights.items() if not (np.isfinite(w) and w >= 0)}
    if bad_values:
        raise ValueError(f"gap_weights must be finite and >= 0, got {bad_values}")
    listed_zero = {g for g, w in gap_weights.items() if w == 0}
    if listed_zero >= set(range(MIN_GAP, max_tr + 1)):
        raise ValueError("gap_weights excludes every gap; give at least one gap a positive weight")


def sample_weights(samples: Iterable[TrainingSample], gap_weights: Mapping[int, float] | None = None) -> np.ndarray:
    """Per-tuple sampling weights (float64) for a weighted sampler: ``gap_weights.get(gap, 1.0)``."""
    weights = dict(gap_weights or {})
    return np.array([float(weights.get(s.gap, 1.0)) for s in samples], dtype=np.float64)


def gap_shares(samples: Sequence[TrainingSample], gap_weights: Mapping[int, float] | None = None) -> dict[int, float]:
    """Probability that a drawn tuple has each gap, under ``gap_weights`` (uniform over tuples if None)."""
    weights = sample_weights(samples, gap_weights)
    total = weights.sum()
    if total <= 0:
        raise ValueError("no tuple has a positive weight")
    shares: dict[int, float] = {}
    for sample, weight in zip(samples, weights):
        shares[sample.gap] = shares.get(sample.gap, 0.0) + float(weight / total)
    return shares
