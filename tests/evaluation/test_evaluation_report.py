"""The evaluation report: spread over studies, issue 10's targets at their bounds, JSON and Markdown."""

from __future__ import annotations

import json
import math

import pytest

from ctp_node.evaluation.report import EvaluationReport, Row, StaticRow, spread

MAPS_1S = {"map.cbf": 0.18, "map.cbv": 0.36, "map.mtt": 0.24, "map.tmax": 0.86}
MAPS_LINEAR = {"map.cbf": 0.22, "map.cbv": 0.41, "map.mtt": 0.41, "map.tmax": 1.6}


def _row(study: str, candidate: str, **metrics: float) -> Row:
    return Row(study, 4, candidate, dict(metrics))


def _report(model: dict[str, float], linear: dict[str, float] | None = None) -> EvaluationReport:
    linear = {
        "offset_hu.gm": 0.05, "curve_rmse_hu.gm": 2.0, "psnr_db": 24.8,
        "aif.peak_hu_abs_error": 60.0, "aif.peak_time_abs_error_s": 1.0, **MAPS_LINEAR, **(linear or {}),
    }  # fmt: skip
    reference = {"offset_hu.gm": 0.0, "curve_rmse_hu.gm": 0.3, "psnr_db": 22.0, **MAPS_1S}
    rows = []
    for study in ("s1", "s2"):
        rows += [_row(study, "model", **model), _row(study, "linear", **linear), _row(study, "reference", **reference)]
    return EvaluationReport(rows=rows)


GOOD_MODEL = {
    "offset_hu.gm": -0.29, "curve_rmse_hu.gm": 1.0, "psnr_db": 26.8,
    "aif.peak_hu_abs_error": 30.0, "aif.peak_time_abs_error_s": 0.5,
    "map.cbf": 0.15, "map.cbv": 0.28, "map.mtt": 0.24, "map.tmax": 0.86,
}  # fmt: skip


def _verdicts(report: EvaluationReport) -> dict[str, bool]:
    return {t["target"]: t["pass"] for t in report.targets()}


def test_spread_is_mean_sample_std_min_max_of_finite_values():
    s = spread([1.0, 2.0, 6.0, math.nan])
    assert s == {"mean": 3.0, "std": pytest.approx(math.sqrt(7.0)), "min": 1.0, "max": 6.0, "n": 3}
    assert spread([5.0])["std"] == 0.0
    assert spread([math.nan])["n"] == 0


def test_summary_gives_the_spread_per_gap_and_candidate():
    report = EvaluationReport(rows=[_row("a", "model", psnr_db=20.0), _row("b", "model", psnr_db=24.0)])
    (item,) = report.summary()
    assert (item["gap_s"], item["candidate"], item["studies"]) == (4, "model", 2)
    assert item["metrics"]["psnr_db"]["mean"] == 22.0
    assert item["metrics"]["psnr_db"]["min"] == 20.0 and item["metrics"]["psnr_db"]["max"] == 24.0


def test_a_model_exactly_at_every_bound_passes():
    verdicts = _verdicts(_report(GOOD_MODEL))
    assert len(verdicts) == 9  # offset, curves, 4 maps, PSNR, AIF height and time
    assert all(verdicts.values()), verdicts


@pytest.mark.parametrize(
    ("key", "value", "target"),
    [
        ("offset_hu.gm", 0.31, "tissue offset"),
        ("offset_hu.gm", -0.31, "tissue offset"),
        ("curve_rmse_hu.gm", 1.01, "curve RMSE"),
        ("map.cbf", 0.155, "CBF"),  # 0.7 x linear = 0.154
        ("map.tmax", 0.87, "TMAX"),  # worse than the 1 s acquisition (0.86), better than 0.7 x linear
        ("psnr_db", 26.79, "PSNR"),
        ("aif.peak_hu_abs_error", 30.1, "AIF peak height"),
        ("aif.peak_time_abs_error_s", 0.6, "AIF peak time"),
    ],
)
def test_a_model_just_past_one_bound_fails_that_target_only(key, value, target):
    verdicts = _verdicts(_report({**GOOD_MODEL, key: value}))
    failed = [name for name, ok in verdicts.items() if not ok]
    assert len(failed) == 1 and target in failed[0], verdicts


def test_static_rows_are_judged_on_mean_and_mean_absolute():
    report = EvaluationReport()
    for mean, mean_abs in ((0.5, 2.0), (-0.51, 1.0), (0.1, 2.1)):
        report.static_rows.append(StaticRow("ct.dcm", 4, mean, mean_abs, mean, 1000, 6, 0.0, 1.5))
    assert [t["pass"] for t in report.targets()] == [True, False, False]
    assert "| ct.dcm | 4 | 6 | -0.51 | 1.00 |" in report.markdown()


def test_markdown_shows_mean_and_std_and_verdicts_and_json_has_no_nan(tmp_path):
    report = _report({**GOOD_MODEL, "offset_hu.wm": 1.8, "offset_hu.csf": math.nan})
    md = report.markdown()
    assert "| 4 | model | -0.29 ± 0.00 | +1.80 ± 0.00 | **fail** |" in md  # CSF all-NaN: no column
    assert "| 4 | 1 s acquisition |" in md and "| 4 | linear interpolation |" in md
    assert "worst WM +1.80 HU (over: WM)" in md
    json_path, md_path = report.write(tmp_path)
    data = json.loads(json_path.read_text())  # write() refuses NaN: allow_nan=False
    assert {s["candidate"] for s in data["summary"]} == {"model", "linear", "reference"}
    assert md_path.read_text().endswith(md)
