"""An outside reference: the OSIPI DSC test cases (issue 21, items 3 and 4).

The 14 DSC cases of the OSIPI DCE-DSC-MRI code collection (data/osipi_dsc/, Apache-2.0) through the
default analysis, with OSIPI's own tolerances (CBF within 15 + 10 %, CBV within 1 + 10 %). The
target: CBF and CBV within them in at least 13 of the 14 cases (the osipy package reports 11 for its
oSVD and 10 for its cSVD).

Measured (see docs/benchmarks.md, benchmarks/osipi_dsc.py): 14 of 14. Before the fit's delay grid
started below 0 it was 11 of 14: CBF +31.1, +35.4, +19.9 over the reference in CBV4_CBF60, CBV4_CBF70
and CBV2_CBF35. The data were simulated with a left-Riemann discrete convolution
(C_i = F dt sum_k AIF_{i-k} R(k dt)), whose tissue curve leads the continuous-time model by
dt/2 = 0.62 s; a fit that allows no delay below 0 meets the lead by shortening MTT, and
CBF = area / MTT compounds it. The same cases re-simulated with a continuous convolution passed
within 3 % either way.

Only the default method runs here (one analysis of the 14 cases, about a second on an idle machine;
the model-subspace SVD in it is slow where BLAS threads compete for busy cores). bSVD and oSVD side
by side: benchmarks/osipi_dsc.py (both 14 of 14 when this was written).
"""

from __future__ import annotations

import hashlib
from functools import cache

import numpy as np
import pytest

from tests.perfusion import osipi_dsc

TARGET = 13  # of 14, issue 21 item 3
CASES = osipi_dsc.load_cases()
LABELS = [osipi_dsc.short_label(c) for c in CASES]


@cache
def estimates(method: str) -> tuple[osipi_dsc.Estimate, ...]:
    return tuple(osipi_dsc.analyse(CASES, method))


def passed(method: str) -> list[str]:
    return [label for label, c, e in zip(LABELS, CASES, estimates(method)) if all(e.passes(c))]


def describe(method: str) -> str:
    rows = []
    for label, c, e in zip(LABELS, CASES, estimates(method)):
        ok_cbf, ok_cbv = e.passes(c)
        rows.append(
            f"{label}: CBF {e.cbf:.1f} vs {c.cbf:g} (tol {osipi_dsc.cbf_tolerance(c):.1f})"
            f"{'' if ok_cbf else ' FAIL'}, CBV {e.cbv:.2f} vs {c.cbv:g}{'' if ok_cbv else ' FAIL'}"
        )
    return "\n".join(rows)


def test_the_data_are_osipis_file_unchanged():
    digest = hashlib.sha256(osipi_dsc.DATA_FILE.read_bytes()).hexdigest()
    assert digest == osipi_dsc.DATA_SHA256
    assert len(CASES) == 14 and len(set(LABELS)) == 14
    for case in CASES:
        assert case.tissue.shape == case.aif.shape == (161,)
        assert case.tr_s == pytest.approx(1.243)
        assert np.array_equal(case.aif, CASES[0].aif)  # one AIF: the cases make one study


def test_osipis_criterion_is_assert_allclose():
    # |estimate - reference| <= atol + rtol * |reference|, as numpy.testing.assert_allclose checks it.
    assert osipi_dsc.within(70 + 22.0, 70, 0.1, 15) and not osipi_dsc.within(70 + 22.01, 70, 0.1, 15)
    assert osipi_dsc.within(4 - 1.4, 4, 0.1, 1) and not osipi_dsc.within(4 - 1.41, 4, 0.1, 1)
    assert not osipi_dsc.within(float("nan"), 4, 0.1, 1)


@pytest.mark.parametrize("index", range(len(LABELS)), ids=LABELS)
def test_default_analysis_case(index):
    case, est = CASES[index], estimates("parametric")[index]
    ok_cbf, ok_cbv = est.passes(case)
    assert ok_cbv, f"CBV {est.cbv:.3f} vs {case.cbv:g}"
    assert ok_cbf, f"CBF {est.cbf:.2f} vs {case.cbf:g}"


def test_default_analysis_meets_osipi_tolerances_in_13_of_14_cases():
    ok = passed("parametric")
    assert len(ok) >= TARGET, f"{len(ok)} of 14 within OSIPI's tolerances:\n{describe('parametric')}"


def test_the_fit_reaches_below_zero_delay_but_reports_tmax_of_at_least_zero():
    # The cases' tissue leads the AIF by half a frame: without atoms below 0 delay the fit shortened
    # MTT instead (11 of 14). The reported Tmax stays >= 0 (a map reader never sees a negative delay).
    from ctp_node.perfusion import parametric

    assert parametric.GAMMA_DELAY_GRID_S[0] < 0
    for est in estimates("parametric"):
        assert est.tmax >= 0.0


def test_cbv_is_within_osipi_tolerance_in_every_case():
    for label, case, est in zip(LABELS, CASES, estimates("parametric")):
        assert est.passes(case)[1], f"{label}: CBV {est.cbv:.3f} vs {case.cbv:g}"
