"""The guardrail: does a series' synthetic seconds stay consistent with its acquired ones?

Run on the 1 s series in HU on the source grid, after ``from_model_grid`` and before writing. The
reference is the linear interpolation ``I`` of the two acquired volumes around each synthetic
second (``SecondFill.interpolate``: what the node would send without a model). Only the voxels the
model fills are compared: brain voxels within its 0..80 HU window in both neighbours
(``ctp_node.series.grid.from_model_grid``); every other voxel is ``I`` by construction. Three checks:

1. **Class offset.** Per tissue class, the mean of (synthetic - I) over all synthetic seconds. The
   classes split brain voxels by their baseline HU (CSF-ish below ``class_edges_hu[0]``, white-ish
   up to ``class_edges_hu[1]``, grey-ish above). The baseline of a voxel, for the seconds between
   acquired volumes L and R, is its mean over the less enhanced half of the *other* acquired volumes
   (lowest brain mean: before the bolus, after its washout): classing by a baseline that contains
   L's and R's own noise would select voxels whose noise in ``I`` leans one way, and a denoising
   model, which does not copy that noise, would be reported as offset when it is not.
   A model that shrinks the grey/white contrast, or shifts everything, fails here.
2. **Step (sawtooth).** The brain's mean curve at a synthetic second next to an acquired second,
   minus ``I``'s: the step the curve makes beyond the straight line when it leaves or reaches an
   acquired second. The mean of its absolute value over all such seconds; reported with the mean
   per-second change of the acquired curve for scale. A true curve bends away from the straight line
   too (most at the bolus peak), so the tolerance is above what the phantom's noise-free truth gives
   (a few tenths of a HU at 4 s gaps).
3. **Range.** The fraction of compared voxels whose synthetic value lies more than
   ``range_margin_hu`` outside the range of their two acquired neighbours. The model's own output is
   clipped to its 0..80 HU window, so leaving the window shows as saturation, which counts here.

The verdict is plain data (``GuardrailVerdict``), saved as JSON beside the result; the pipeline
applies the policy (``GuardrailSettings.policy``): flag, or fall back to ``I``.

A fourth check runs later, once the perfusion analyses are done (``check_volumes``): the lesion
volumes of the synthetic 1 s series against those of the acquired series alone. Synthetic seconds
add no measurement; a model that is only interpolation at long gaps (or one that invents a bolus)
shows up as core or Tmax > 6 s volumes that jump away from what the acquired frames alone give.
Where the acquired analysis withholds a volume (``ctp_node.perfusion.reliability``) there is nothing
to compare with, and the check says so instead of passing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ctp_node.config import GuardrailSettings
from ctp_node.files import write_json
from ctp_node.permissions import make_dirs
from model.planner import FillPlan, SecondFill
from model.window import WINDOW_HIGH_HU, WINDOW_LOW_HU

CLASSES = ("csf", "white", "grey")
EDGE_SIGMAS = 2.5
VERDICT_FILE = "guardrail.json"


@dataclass(frozen=True)
class CheckResult:
    """One number compared with its tolerance; ``value`` None when there was nothing to measure."""

    name: str
    value: float | None
    tolerance: float
    passed: bool
    voxels: int = 0
    detail: str = ""


@dataclass
class GuardrailVerdict:
    """The outcome for one series: every check, whether all passed, and what the policy did."""

    policy: str
    passed: bool
    action: str  # "none" (passed or off), "flagged", "fallback"
    checks: list[CheckResult] = field(default_factory=list)
    synthetic_seconds: int = 0
    noise_hu: float | None = None  # the estimated image noise that set the edge margins

    @property
    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.passed]

    def summary(self) -> str:
        """One line: the status and the failing checks (or all checks when none fails)."""
        if self.policy == "off":
            return "off"
        shown = self.failed or self.checks
        parts = [_describe(c) for c in shown if c.value is not None]
        status = "pass" if self.passed else self.action
        return f"{status}: " + "; ".join(parts) if parts else status

    def add(self, checks: Sequence[CheckResult]) -> None:
        """Checks made after the verdict was first written (``check_volumes``): a failing one flags the
        series (it is already written; there is nothing left to fall back from)."""
        if self.policy == "off":
            return
        self.checks.extend(checks)
        if any(not c.passed for c in checks):
            self.passed = False
            if self.action == "none":
                self.action = "flagged"

    def comment(self) -> str:
        """What every image of a failing series says about it (empty for a passing one)."""
        if self.passed or self.policy == "off":
            return ""
        what = "; ".join(_describe(c) for c in self.failed)
        if self.action == "fallback":
            return (
                f"GUARDRAIL FALLBACK: the model's synthetic seconds were inconsistent with the acquired ones ({what}) "
                "and were replaced by linear interpolation in time; no image of this series is model output."
            )
        return (
            f"GUARDRAIL FLAG: the synthetic seconds of this series are inconsistent with the acquired ones ({what}); "
            "sent as produced. Check against the acquired images before any use."
        )

    def to_dict(self) -> dict:
        return asdict(self) | {"summary": self.summary()}

    def write(self, folder: Path) -> Path:
        """``guardrail.json`` in ``folder`` (a job's results: modes as for all patient data)."""
        make_dirs(folder)
        return write_json(folder / VERDICT_FILE, self.to_dict())


VOLUME_CHECKS = {"core": "core volume vs acquired", "tmax6": "Tmax > 6 s volume vs acquired"}


def check_volumes(
    synthetic_ml: dict[str, float | None],
    acquired_ml: dict[str, float | None],
    tolerance_ml: float,
    acquired_reasons: dict[str, str] | None = None,
) -> list[CheckResult]:
    """The synthetic series' core and Tmax > 6 s volumes against the acquired series' own (mL).

    ``None`` is a volume its analysis withholds (``acquired_reasons`` says why for the acquired one):
    the check is then not measured, and its detail says why. ``tolerance_ml`` <= 0: no checks."""
    if tolerance_ml <= 0:
        return []
    reasons = acquired_reasons or {}
    checks = []
    for key, name in VOLUME_CHECKS.items():
        syn, acq = synthetic_ml.get(key), acquired_ml.get(key)
        if syn is None or acq is None:
            why = "synthetic volume withheld"
            if acq is None:
                why = f"acquired volume withheld ({reasons.get(key, 'no volume')})"
            checks.append(CheckResult(name, None, tolerance_ml, True, detail=f"not measured: {why}"))
            continue
        jump = syn - acq
        detail = f"synthetic {syn:.1f} mL, acquired alone {acq:.1f} mL"
        checks.append(CheckResult(name, jump, tolerance_ml, abs(jump) <= tolerance_ml, detail=detail))
    return checks


def _describe(check: CheckResult) -> str:
    if check.value is None:
        return f"{check.name}: {check.detail or 'not measured'}"
    if check.name in VOLUME_CHECKS.values():
        return f"{check.name} {check.value:+.1f} mL (tolerance {check.tolerance:g} mL; {check.detail})"
    unit = "" if check.name == "range" else " HU"
    value = f"{check.value:.1%}" if check.name == "range" else f"{check.value:+.2f}{unit}"
    tolerance = f"{check.tolerance:.1%}" if check.name == "range" else f"{check.tolerance:g}{unit}"
    return f"{check.name} {value} (tolerance {tolerance})"


def _in_window(hu: np.ndarray) -> np.ndarray:
    return (hu >= WINDOW_LOW_HU) & (hu <= WINDOW_HIGH_HU)


def check_series(
    hu_1s: np.ndarray,
    fill: FillPlan,
    source_hu: np.ndarray,
    times_s: np.ndarray,
    brain_mask: np.ndarray,
    settings: GuardrailSettings,
) -> GuardrailVerdict:
    """The three checks (module docstring) over the model's (``synthetic``) seconds of ``fill``.

    ``hu_1s``: (T1, Z, Y, X) HU as it would be written; ``fill``: the engine's record of what fills
    each grid second (``model.planner.FillPlan``); ``source_hu``: (T, Z, Y, X) the acquired volumes,
    acquired at ``times_s`` (T,); ``brain_mask``: (Z, Y, X) bool on the source grid.
    """
    sources = fill.fills
    model_seconds = [g for g, s in enumerate(sources) if s.kind == "synthetic"]
    if settings.policy == "off":
        return GuardrailVerdict("off", True, "none", [], len(model_seconds))
    if hu_1s.shape[0] != len(sources) or hu_1s.shape[1:] != source_hu.shape[1:]:
        raise ValueError(f"hu_1s {hu_1s.shape} does not match {len(sources)} seconds of {source_hu.shape[1:]}")
    if not model_seconds:
        return GuardrailVerdict(settings.policy, True, "none", [], 0)

    acquired = list(fill.volumes)  # the volumes the series uses
    noise = noise_hu(source_hu, acquired, brain_mask)
    # A voxel whose baseline lies within ``EDGE_SIGMAS`` noise sigmas of the window's ends is left out
    # of the offset and step checks: the model fills a voxel only where both neighbours are inside the
    # window, which near an end selects neighbours whose noise leans inwards, so ``I`` there is biased
    # and a model that does not copy the noise would be reported as offset (CSF at 12 HU with 10 HU of
    # noise: -1.9 HU for the noise-free truth itself; -0.3 HU at 6 HU of noise).
    inner = (WINDOW_LOW_HU + EDGE_SIGMAS * noise, WINDOW_HIGH_HU - EDGE_SIGMAS * noise)
    # The least enhanced volumes first (before the bolus and after it has washed out): their mean is
    # the baseline that sorts voxels into tissue classes.
    by_enhancement = sorted(acquired, key=lambda k: _brain_mean(source_hu[k], brain_mask))
    low_edge, high_edge = settings.class_edges_hu
    sums = dict.fromkeys(CLASSES, 0.0)
    counts = dict.fromkeys(CLASSES, 0)
    steps: dict[str, list[float]] = {name: [] for name in CLASSES}
    slopes: list[float] = []
    outside = compared = 0
    by_gap: dict[tuple[int, int], list[int]] = {}
    for g in model_seconds:
        by_gap.setdefault((sources[g].left, sources[g].right), []).append(g)
    for (left, right), seconds in by_gap.items():
        l_hu, r_hu = source_hu[left], source_hu[right]
        where = brain_mask & _in_window(l_hu) & _in_window(r_hu)
        n_where = int(where.sum())
        if n_where == 0:
            continue
        # The baseline without L's and R's own noise (see the module docstring): the less enhanced
        # half of the other volumes; with only two acquired volumes there is no other, and theirs has to do.
        others = [k for k in by_enhancement if k not in (left, right)] or [left, right]
        chosen = others[: max(1, (len(others) + 1) // 2)]
        baseline = np.mean([source_hu[k] for k in chosen], axis=0, dtype=np.float64)
        base = baseline[where]
        inside = (base >= inner[0]) & (base <= inner[1])
        masks = {
            "csf": inside & (base < low_edge),
            "white": inside & (base >= low_edge) & (base < high_edge),
            "grey": inside & (base >= high_edge),
        }
        low = np.minimum(l_hu, r_hu)[where] - settings.range_margin_hu
        high = np.maximum(l_hu, r_hu)[where] + settings.range_margin_hu
        change = float(np.mean(r_hu[where], dtype=np.float64) - np.mean(l_hu[where], dtype=np.float64))
        slopes.append(abs(change) / max(float(times_s[right] - times_s[left]), 1e-6))
        for g in seconds:
            synthetic = hu_1s[g][where]
            diff = synthetic.astype(np.float64) - sources[g].interpolate(source_hu)[where]
            boundary = _next_to_acquired(sources, g)
            for name, mask in masks.items():
                n = int(mask.sum())
                total_diff = float(diff[mask].sum())
                sums[name] += total_diff
                counts[name] += n
                if boundary and n:
                    steps[name].append(total_diff / n)
            outside += int(np.count_nonzero((synthetic < low) | (synthetic > high)))
            compared += synthetic.size

    checks = []
    for name in CLASSES:
        n = counts[name]
        if n < settings.min_class_voxels:
            note = f"fewer than {settings.min_class_voxels} voxel-seconds: not measured"
            checks.append(CheckResult(f"{name} offset", None, settings.class_offset_hu, True, n, note))
            continue
        offset = sums[name] / n
        ok = abs(offset) <= settings.class_offset_hu
        note = "mean of synthetic - interpolated over all synthetic seconds"
        checks.append(CheckResult(f"{name} offset", round(offset, 3), settings.class_offset_hu, ok, n, note))
    # The step of the mean curve of each class that has enough voxels; the worst one is the check.
    class_steps = {
        name: float(np.mean(np.abs(values)))
        for name, values in steps.items()
        if values and counts[name] >= settings.min_class_voxels
    }
    if class_steps:
        worst = max(class_steps, key=lambda name: class_steps[name])
        step = class_steps[worst]
        slope = float(np.mean(slopes)) if slopes else math.nan
        note = (
            f"mean |class mean curve - interpolated| at the {len(steps[worst])} synthetic seconds next to an "
            f"acquired one, worst class {worst} ("
            + ", ".join(f"{k} {v:.2f}" for k, v in class_steps.items())
            + f" HU); the acquired brain curve changes {slope:.2f} HU/s on average"
        )
        checks.append(
            CheckResult("step", round(step, 3), settings.step_hu, step <= settings.step_hu, counts[worst], note)
        )
    if compared:
        fraction = outside / compared
        ok = fraction <= settings.range_fraction
        note = (
            f"{outside} voxel-seconds more than {settings.range_margin_hu:g} HU outside the range of their "
            "acquired neighbours"
        )
        checks.append(CheckResult("range", round(fraction, 5), settings.range_fraction, ok, compared, note))
    passed = all(c.passed for c in checks)
    action = "none" if passed else ("fallback" if settings.policy == "fallback" else "flagged")
    return GuardrailVerdict(settings.policy, passed, action, checks, len(model_seconds), round(noise, 2))


def noise_hu(source_hu: np.ndarray, volumes: Sequence[int], brain_mask: np.ndarray) -> float:
    """The image noise (HU, one voxel's standard deviation), from differences of consecutive acquired
    volumes inside the brain and the window: a robust spread (MAD) per pair, the smallest over pairs
    (before the bolus arrives a difference is noise alone)."""
    estimates = []
    for a, b in zip(volumes[:-1], volumes[1:]):
        both = brain_mask & _in_window(source_hu[a]) & _in_window(source_hu[b])
        if both.sum() < 100:
            continue
        diff = source_hu[b][both].astype(np.float64) - source_hu[a][both]
        estimates.append(1.4826 * float(np.median(np.abs(diff - np.median(diff)))) / math.sqrt(2.0))
    return min(estimates) if estimates else 0.0


def _brain_mean(volume: np.ndarray, brain_mask: np.ndarray) -> float:
    values = volume[brain_mask & _in_window(volume)]
    return float(values.mean(dtype=np.float64)) if values.size else math.inf


def _next_to_acquired(sources: Sequence[SecondFill], g: int) -> bool:
    return any(0 <= n < len(sources) and sources[n].kind == "acquired" for n in (g - 1, g + 1))


def fall_back(hu_1s: np.ndarray, fill: FillPlan, source_hu: np.ndarray) -> FillPlan:
    """Replace every model second of ``hu_1s`` (in place) by ``I``; returns the plan with those seconds
    ``interpolated`` (reason: the guardrail) and the voxel counts, which described the model's images, dropped."""
    for g, src in enumerate(fill.fills):
        if src.kind == "synthetic":
            hu_1s[g] = src.interpolate(source_hu)
    return fill.model_replaced()
