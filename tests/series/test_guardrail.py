"""The guardrail: synthetic seconds checked against the acquired ones; flag or fall back to interpolation."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
import torch

from ctp_node.config import GuardrailSettings
from ctp_node.phantom.dicom_study import write_study
from ctp_node.series.derived import DerivedRecipe
from ctp_node.series.guardrail import VERDICT_FILE, check_series, fall_back, noise_hu
from ctp_node.series.pipeline import SeriesPipeline, run_series
from model import EngineSettings, Inpainter
from tests.series.fill_helpers import fill_for
from tests.series.helpers import ring_head

# --- the checks on plain arrays ---------------------------------------------------------------------

TIMES = np.array([0.0, 4.0, 8.0, 12.0])
GRID = np.arange(13.0)
REGIONS = {"grey": (slice(0, 16), 40.0, 3.0), "white": (slice(16, 32), 28.0, 0.5), "csf": (slice(32, 48), 12.0, 0.0)}


def acquired_series(noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """(4, 2, 48, 48): three tissue bands, the contrast arriving at 4 s (grey 40 HU, then rising 3
    HU/s; white 28 HU + 0.5 HU/s; CSF 12 HU)."""
    hu = np.zeros((TIMES.size, 2, 48, 48), dtype=np.float32)
    for rows, base, slope in REGIONS.values():
        hu[:, :, rows] = (base + slope * np.maximum(TIMES - 4, 0))[:, None, None, None]
    if noise:
        hu += np.random.default_rng(seed).normal(0, noise, hu.shape).astype(np.float32)
    return hu


def one_second(hu: np.ndarray, edit=None) -> tuple[np.ndarray, list]:
    """The 1 s series the node would write with linear interpolation, each synthetic second passed
    through ``edit(volume, source)`` (the stand-in for the model)."""
    sources = fill_for(TIMES, ~np.isin(GRID, TIMES))
    out = np.empty((GRID.size, *hu.shape[1:]), dtype=np.float32)
    for g, src in enumerate(sources.fills):
        out[g] = hu[src.left] if src.kind == "acquired" else src.interpolate(hu)
        if src.kind == "synthetic" and edit is not None:
            out[g] = edit(out[g], src)
    return out, sources


def verdict_of(hu, out, sources, **settings):
    brain = np.ones(hu.shape[1:], dtype=bool)
    return check_series(out, sources, hu, TIMES, brain, GuardrailSettings(**settings))


def values(verdict):
    return {c.name: c.value for c in verdict.checks}


def test_linear_interpolation_passes_every_check():
    hu = acquired_series()
    out, sources = one_second(hu)
    verdict = verdict_of(hu, out, sources)
    assert verdict.passed and verdict.action == "none" and verdict.synthetic_seconds == 9
    assert values(verdict) == {"csf offset": 0.0, "white offset": 0.0, "grey offset": 0.0, "step": 0.0, "range": 0.0}
    assert verdict.comment() == ""


def test_an_offset_in_one_tissue_fails_that_class_and_the_step():
    hu = acquired_series()

    def darker_grey(volume, src):
        volume[:, REGIONS["grey"][0]] -= 2.0
        return volume

    out, sources = one_second(hu, darker_grey)
    verdict = verdict_of(hu, out, sources)
    assert not verdict.passed and verdict.action == "flagged"
    assert {c.name for c in verdict.failed} == {"grey offset", "step"}
    assert values(verdict)["grey offset"] == pytest.approx(-2.0) and values(verdict)["white offset"] == 0.0
    assert "grey offset -2.00 HU (tolerance 1 HU)" in verdict.summary()
    assert verdict.comment().startswith("GUARDRAIL FLAG") and "grey offset" in verdict.comment()


def test_a_curve_that_stays_flat_between_acquisitions_is_a_sawtooth():
    hu = acquired_series()

    def flat(volume, src):  # the mean of the two neighbours at every second of the gap
        return 0.5 * (hu[src.left] + hu[src.right])

    out, sources = one_second(hu, flat)
    verdict = verdict_of(hu, out, sources)
    # The mean over a gap is unbiased, so the class offsets pass; the steps at acquired seconds do not.
    assert [c.name for c in verdict.failed] == ["step"]
    # grey: a quarter of the gap's 12 HU at the 4 seconds next to an acquired one in the two rising
    # gaps, nothing in the first (flat) gap: mean 2 HU over 6 seconds
    assert values(verdict)["step"] == pytest.approx(2.0)


def test_values_far_outside_the_neighbours_fail_the_range():
    hu = acquired_series()
    rng = np.random.default_rng(1)
    out, sources = one_second(hu, lambda v, s: rng.uniform(0, 80, v.shape).astype(np.float32))
    verdict = verdict_of(hu, out, sources, class_offset_hu=100, step_hu=100)
    assert [c.name for c in verdict.failed] == ["range"] and values(verdict)["range"] > 0.2


def test_policy_off_checks_nothing_and_fallback_says_so():
    hu = acquired_series()
    out, sources = one_second(hu, lambda v, s: v + 5)
    off = verdict_of(hu, out, sources, policy="off")
    assert off.passed and off.checks == [] and off.summary() == "off"
    fallback = verdict_of(hu, out, sources, policy="fallback")
    assert fallback.action == "fallback" and fallback.comment().startswith("GUARDRAIL FALLBACK")
    assert "replaced by linear interpolation" in fallback.comment()


def test_fall_back_puts_back_the_interpolation_and_marks_the_seconds():
    hu = acquired_series(noise=5)
    linear, _ = one_second(hu)
    out, sources = one_second(hu, lambda v, s: v + 5)
    replaced = fall_back(out, sources, hu)
    np.testing.assert_array_equal(out, linear)
    kinds = [s.kind for s in replaced.fills]
    assert kinds.count("interpolated") == 9 and "synthetic" not in kinds
    assert {s.reason for s in replaced.fills if s.kind == "interpolated"} == {"guardrail"}


def test_a_class_with_too_few_voxels_is_not_measured_and_does_not_fail():
    hu = acquired_series()
    out, sources = one_second(hu)
    verdict = verdict_of(hu, out, sources, min_class_voxels=10**6)
    assert verdict.passed and all(c.value is None for c in verdict.checks if c.name.endswith("offset"))
    assert "not measured" in verdict.checks[0].detail


def test_noise_is_estimated_from_consecutive_acquisitions():
    hu = acquired_series(noise=8.0)
    brain = np.ones(hu.shape[1:], dtype=bool)
    assert noise_hu(hu, range(4), brain) == pytest.approx(8.0, rel=0.1)


def test_voxels_near_the_window_edges_are_left_out_with_noise():
    # CSF at 12 HU with 8 HU of noise: within 2.5 sigma of 0 HU, so the CSF class is not measured
    # (its interpolation is biased where the model fills only in-window voxels).
    hu = acquired_series(noise=8.0)
    out, sources = one_second(hu)
    verdict = verdict_of(hu, out, sources, class_edges_hu=(18.0, 32.0))
    checks = {c.name: c for c in verdict.checks}
    assert checks["csf offset"].value is None and checks["grey offset"].value is not None
    assert verdict.noise_hu == pytest.approx(8.0, rel=0.1)


def test_the_verdict_is_plain_json(tmp_path):
    hu = acquired_series()
    out, sources = one_second(hu, lambda v, s: v + 3)
    path = verdict_of(hu, out, sources).write(tmp_path)
    data = json.loads(path.read_text())
    assert path.name == VERDICT_FILE and data["passed"] is False and data["action"] == "flagged"
    assert {c["name"] for c in data["checks"]} == {"csf offset", "white offset", "grey offset", "step", "range"}
    assert data["summary"].startswith("flagged: ")


def test_mismatched_inputs_are_refused():
    hu = acquired_series()
    out, sources = one_second(hu)
    with pytest.raises(ValueError, match="does not match"):
        verdict_of(hu, out[:5], sources)


# --- the pipeline with a deliberately biased network --------------------------------------------------
# On the analytic ring head: its brain is uniform, so the round trip to the model grid and back leaves
# interpolation unchanged. (On the phantom's fine anatomy that round trip alone blurs CSF-ish voxels
# by several HU, which the guardrail rightly reports: measured in the report of this change.)


class InterpolatingNet(torch.nn.Module):
    """An x0 'network' that returns the linear interpolation of its two conditioning volumes plus
    ``bias_hu`` (model space: 40 HU per unit): an unbiased model when 0, a biased one otherwise."""

    def __init__(self, bias_hu: float = 0.0) -> None:
        super().__init__()
        self.bias = bias_hu / 40.0
        self.config = SimpleNamespace(prediction="x0")

    def forward(self, x, local, scenario, g):
        before, after = local[:, 0] * 6 + 1, local[:, 1] * 6 + 1  # planner.local_context with max_tr 8
        weight = (before / (before + after)).reshape(-1, 1, 1, 1, 1)
        left, right = x[:, 0:1], x[:, 2:3]
        return (left + weight * (right - left) + self.bias).clamp(-1, 1)


def pipeline(bias_hu: float, policy: str = "flag") -> SeriesPipeline:
    engine = Inpainter(InterpolatingNet(bias_hu), EngineSettings(sampler="ddim", steps=1), device="cpu")
    recipe = DerivedRecipe("test model", "1", "test.pt sha256:0", "ddim", 1)
    return SeriesPipeline(engine, recipe, guardrail=GuardrailSettings(policy=policy))


def comments(result, second: float) -> list[str]:
    index = int(np.flatnonzero(result.times_s == second)[0])
    paths = [p for p in result.derived.paths if p.name.startswith(f"CTP1S_{index:04d}_")]
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    series = ring_head(shape_zyx=(8, 200, 200), spacing_zyx=(5.0, 0.9375, 0.9375), times_s=(0.0, 4.0, 8.0, 12.0))
    return series, write_study(series, tmp_path_factory.mktemp("ring"), uid_seed="guardrail ring")


@pytest.fixture(scope="module")
def unbiased(ring, tmp_path_factory):
    return run_series(pipeline(0.0), ring[1], tmp_path_factory.mktemp("unbiased"))


def test_an_unbiased_model_passes(unbiased):
    verdict = unbiased.guardrail
    assert verdict.passed, verdict.summary()
    assert all(abs(c.value) < 0.5 for c in verdict.checks if c.name.endswith("offset") and c.value is not None)
    assert all("GUARDRAIL" not in ds.ImageComments for ds in comments(unbiased, 2.0))


def test_a_biased_model_is_flagged_and_sent_as_it_is(ring, tmp_path, unbiased):
    result = run_series(pipeline(5.0, "flag"), ring[1], tmp_path)
    verdict = result.guardrail
    assert verdict.action == "flagged"
    offsets = {c.name: c.value for c in verdict.checks if c.name.endswith("offset") and c.value is not None}
    assert offsets and all(4.0 < v < 6.0 for v in offsets.values()), offsets
    assert json.loads((tmp_path / VERDICT_FILE).read_text())["action"] == "flagged"
    assert result.synthetic.sum() == 9  # still the model's seconds
    for second in (2.0, 4.0):  # synthetic and acquired images alike say it
        assert all("GUARDRAIL FLAG" in ds.ImageComments for ds in comments(result, second))
    synthetic = comments(result, 2.0)[0]
    assert synthetic.ImageComments.startswith("SYNTHETIC")
    assert result.derived.series_uid != unbiased.derived.series_uid  # a flagged result is its own series


def test_a_biased_model_falls_back_to_interpolation(ring, tmp_path):
    result = run_series(pipeline(5.0, "fallback"), ring[1], tmp_path)
    assert result.guardrail.action == "fallback"
    assert not result.synthetic.any() and result.interpolated.sum() == 9
    ds = pydicom.dcmread(next(p for p in result.derived.paths if p.name.startswith("CTP1S_0002_")))
    assert ds.ImageComments.startswith("INTERPOLATED image at 2 s") and "GUARDRAIL FALLBACK" in ds.ImageComments
    assert "failed the guardrail check" in ds.DerivationDescription
    # the pixels are the linear interpolation of the acquired volumes at 0 and 4 s, to the integer HU
    hu = ring[0].hu
    expected = hu[0] + 0.5 * (hu[1] - hu[0])
    z = int(ds.InstanceNumber - 1) % hu.shape[1]
    assert np.abs(ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) - expected[z]).max() <= 0.5


def test_volumes_that_jump_away_from_the_acquired_analysis_are_flagged():
    from ctp_node.series.guardrail import CheckResult, GuardrailVerdict, check_volumes

    checks = check_volumes({"core": 200.3, "tmax6": 39.2}, {"core": 61.0, "tmax6": 30.0}, 15.0)
    core, tmax6 = checks
    assert not core.passed and core.value == pytest.approx(139.3) and "acquired alone 61.0 mL" in core.detail
    assert tmax6.passed and tmax6.value == pytest.approx(9.2)
    verdict = GuardrailVerdict(policy="flag", passed=True, action="none", checks=[CheckResult("step", 0.1, 1.0, True)])
    verdict.add(checks)
    assert (verdict.passed, verdict.action) == (False, "flagged")
    assert "core volume vs acquired +139.3 mL (tolerance 15 mL" in verdict.summary()
    assert "GUARDRAIL FLAG" in verdict.comment()
    # Nothing to compare with where the acquired analysis withholds its volume: said, not passed silently.
    unmeasured = check_volumes({"core": 200.3, "tmax6": None}, {"core": None, "tmax6": 3.0}, 15.0, {"core": "noise"})
    assert [c.value for c in unmeasured] == [None, None]
    assert unmeasured[0].detail == "not measured: acquired volume withheld (noise)"
    assert unmeasured[1].detail == "not measured: synthetic volume withheld"
    assert check_volumes({"core": 1.0}, {"core": 90.0}, 0.0) == []  # switched off
    off = GuardrailVerdict(policy="off", passed=True, action="none")
    off.add(checks)
    assert off.passed and off.checks == []
