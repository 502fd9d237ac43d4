"""Issue 20's volume measures: volumes as measured against the noise-free series' analysis, the DEFUSE 3
mismatch decision, and what the node would withhold."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from ctp_node.evaluation.phantom_study import volume_metrics
from ctp_node.evaluation.report import EvaluationReport, Row
from ctp_node.perfusion.lesion import defuse3_mismatch


@pytest.mark.parametrize(
    ("core", "tmax6", "eligible"),
    [
        (20.0, 60.0, True),  # ratio 3, mismatch 40
        (0.0, 15.0, True),  # no core: the ratio is no obstacle
        (0.0, 14.9, False),  # mismatch under 15 mL
        (69.9, 130.0, True),
        (70.0, 200.0, False),  # core not under 70 mL
        (40.0, 71.9, False),  # ratio 1.797
        (40.0, 72.0, True),  # ratio 1.8
        (10.0, 24.0, False),  # ratio 2.4 but mismatch 14
        (None, 60.0, None),
    ],
)
def test_defuse3_mismatch(core, tmax6, eligible):
    assert defuse3_mismatch(core, tmax6) is eligible


@dataclass
class Maps:
    core: float
    tmax6: float
    withheld: dict = field(default_factory=dict)

    @property
    def measured_volumes_ml(self):
        return {"core": self.core, "tmax6": self.tmax6, "tmax10": 0.0}


def test_volume_metrics_use_measured_volumes_and_say_what_is_withheld():
    truth = Maps(59.0, 59.0)  # core inside the hypoperfusion, no mismatch: not eligible
    wrong = Maps(200.0, 39.0, withheld={"core": "mirror"})
    m = volume_metrics(wrong, truth)
    assert m["volume_error_ml.core"] == pytest.approx(141.0) and m["volume_abs_error_ml.tmax6"] == pytest.approx(20)
    assert m["volume_ml.mismatch"] == pytest.approx(-161.0) and m["volume_truth_ml.mismatch"] == 0.0
    assert (m["decision.defuse3"], m["decision.truth_defuse3"], m["decision.agrees"]) == (0.0, 0.0, 1.0)
    assert (m["withheld.core"], m["withheld.tmax6"], m["decision.reported"]) == (1.0, 0.0, 0.0)
    eligible = volume_metrics(Maps(10.0, 80.0), truth)
    assert (eligible["decision.defuse3"], eligible["decision.agrees"], eligible["decision.reported"]) == (1, 0, 1)


def test_the_report_tables_volumes_and_marks_a_disagreeing_decision():
    truth = Maps(20.0, 80.0)
    report = EvaluationReport()
    studies = {"s1": ((22, 78), (60, 70), (21, 82)), "s2": ((25, 75), (90, 100), (18, 79))}
    for study, (model, linear, ref) in studies.items():
        for name, volumes in (("model", model), ("linear", linear), ("reference", ref)):
            report.rows.append(Row(study, 8, name, volume_metrics(Maps(*map(float, volumes)), truth)))
    table = report.markdown()
    assert "Lesion volumes vs the same analysis of the noise-free series" in table
    lines = {line.split("|")[2].strip(): line for line in table.splitlines() if line.startswith("| 8 |")}
    # model mean |error|: core (2 + 5) / 2, Tmax > 6 s (2 + 5) / 2; linear core (40 + 70) / 2
    assert "| 3.5 | 3.5 |" in lines["model"] and "| 55.0 |" in lines["linear interpolation"]
    assert "| 2/2 |" in lines["model"] and "| 0/2 |" in lines["linear interpolation"]
    # within the 1 s acquisition's (core 1.5, Tmax 2.5)? no; within half of linear's? yes
    assert lines["model"].rstrip().endswith("| **fail** | pass |")
    assert "| s2 | 8 | linear interpolation | 90.0 (20.0) |" in table and "no (DISAGREES)" in table
