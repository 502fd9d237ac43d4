"""The OSIPI DSC test cases (data/osipi_dsc/) run through ``compute_perfusion``, with OSIPI's tolerances.

Source: OSIPI DCE-DSC-MRI_CodeCollection, ``test/DSCmodels/data/dsc_data.csv`` (Apache-2.0, see
data/osipi_dsc/README.md): 14 noisy tissue curves (CBV 4 mL/100 mL with CBF 10-70, CBV 2 with CBF
5-35 mL/100 mL/min, no delay or dispersion) and one AIF, 161 samples every 1.243 s, in concentration
(Delta R2*) units.

OSIPI's own test (``test/DSCmodels/DSCmodels_data.py``) accepts ``|estimate - reference| <= atol +
rtol * |reference|`` (``numpy.testing.assert_allclose``) with rtol 0.1 for both, atol 1 mL/100 mL
for CBV and 15 mL/100 mL/min for CBF. Its reference implementation uses k = 1 (no haematocrit or
density factor): CBV = 100 * area(C) / area(AIF), CBF = 6000 * max(F R).

The 14 cases share their AIF and sampling, so they become one small study, one case per slice: the
curves are turned into HU (a baseline plus ``HU_PER_UNIT`` times the concentration, a linear map,
so every ratio the analysis forms is unchanged), a block of arterial voxels in every slice carries
the AIF and is given as ``aif_mask``, the other voxels of slice z carry case z's tissue curve, and
``compute_perfusion`` runs with k = 1 and no venous partial-volume scaling (there is no vein).
Everything else is the default analysis: frames and the bolus arrival as detected, the uniform 1 s
grid, the model-subspace projection and TIPS filter, the dictionary fit, CBV as the area ratio and
CBF = CBV / fitted MTT * 60. Nothing in it mixes slices except the bolus arrival and the AIF (both
from the identical arterial voxels) and the noise level that scales the in-plane TIPS filter, which
leaves a slice of identical curves as it is: each case gets the numbers (to float32 rounding) that a
study of its own gives, in one analysis instead of 14.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctp_node.perfusion import PerfusionSettings, compute_perfusion

DATA_DIR = Path(__file__).parent / "data" / "osipi_dsc"
DATA_FILE = DATA_DIR / "dsc_data.csv"
DATA_SHA256 = "0df1415279cda892cb0e7d68e7437753a85038c637c77b448011b3127b562ed4"
SOURCE = "github.com/OSIPI/DCE-DSC-MRI_CodeCollection test/DSCmodels/data/dsc_data.csv"
SOURCE_COMMIT = "40984f7c7c34dbca4fa3ed4ccbf65ffd2f30ffb4"
# OSIPI's tolerances (test/DSCmodels/DSCmodels_data.py), the same for all 14 cases.
RTOL_CBV, ATOL_CBV = 0.1, 1.0
RTOL_CBF, ATOL_CBF = 0.1, 15.0
METHODS = ("parametric", "bsvd", "osvd")  # the default first

HU_PER_UNIT = 100.0  # AIF peak ~450 HU, tissue peaks 2-15 HU
TISSUE_BASELINE_HU = 30.0
ARTERY_BASELINE_HU = 40.0
SLICE = (6, 6)  # (Y, X): two columns of artery, four of tissue
ARTERY_COLUMNS = 2


@dataclass(frozen=True)
class Case:
    label: str
    tissue: np.ndarray  # (T,) concentration
    aif: np.ndarray  # (T,) concentration
    tr_s: float
    cbv: float  # mL/100 mL
    cbf: float  # mL/100 mL/min


@dataclass(frozen=True)
class Estimate:
    cbf: float
    cbv: float
    mtt: float
    tmax: float

    def passes(self, case: Case) -> tuple[bool, bool]:
        """(CBF within OSIPI's tolerance, CBV within it)."""
        return within(self.cbf, case.cbf, RTOL_CBF, ATOL_CBF), within(self.cbv, case.cbv, RTOL_CBV, ATOL_CBV)


def load_cases(path: Path = DATA_FILE) -> list[Case]:
    with open(path, newline="") as handle:
        return [
            Case(
                label=row["label"],
                tissue=np.array(row["C_tis"].split(), dtype=np.float64),
                aif=np.array(row["C_aif"].split(), dtype=np.float64),
                tr_s=float(row["tr"]),
                cbv=float(row["cbv"]),
                cbf=float(row["cbf"]),
            )
            for row in csv.DictReader(handle)
        ]


def short_label(case: Case) -> str:
    """ "test_CNR200_CBV4_CBF10_delay0_dispersion0" -> "CBV4_CBF10"."""
    parts = case.label.split("_")
    return "_".join(p for p in parts if p.startswith(("CBV", "CBF"))) or case.label


def tolerance(reference: float, rtol: float, atol: float) -> float:
    return atol + rtol * abs(reference)


def cbf_tolerance(case: Case) -> float:
    return tolerance(case.cbf, RTOL_CBF, ATOL_CBF)


def within(estimate: float, reference: float, rtol: float, atol: float) -> bool:
    """OSIPI's criterion (numpy.testing.assert_allclose): |estimate - reference| <= atol + rtol |reference|."""
    return bool(np.isfinite(estimate) and abs(estimate - reference) <= tolerance(reference, rtol, atol))


def study(cases: list[Case]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The cases as one (T, Z, Y, X) HU series (slice z: case z), its times, brain and AIF masks."""
    first = cases[0]
    if any(c.tr_s != first.tr_s or not np.array_equal(c.aif, first.aif) for c in cases):
        raise ValueError("the cases do not share their AIF and sampling: analyse them one by one")
    times = first.tr_s * np.arange(first.tissue.size)
    shape = (len(cases), *SLICE)
    hu = np.empty((times.size, *shape), dtype=np.float32)
    hu[..., :ARTERY_COLUMNS] = (ARTERY_BASELINE_HU + HU_PER_UNIT * first.aif)[:, None, None, None]
    tissue = np.stack([TISSUE_BASELINE_HU + HU_PER_UNIT * c.tissue for c in cases], axis=1)  # (T, Z)
    hu[..., ARTERY_COLUMNS:] = tissue[:, :, None, None]
    brain = np.ones(shape, dtype=bool)
    aif_mask = np.zeros(shape, dtype=bool)
    aif_mask[..., :ARTERY_COLUMNS] = True
    return hu, times, brain, aif_mask


def analyse(cases: list[Case], method: str = "parametric") -> list[Estimate]:
    """CBF, CBV, MTT and Tmax of each case's tissue (median over its voxels, which are identical) by
    ``compute_perfusion`` with k = 1 and no VOF scaling, everything else the default."""
    hu, times, brain, aif_mask = study(cases)
    settings = PerfusionSettings(k=1.0, vof_scaling=False)
    maps = compute_perfusion(hu, times, method=method, brain_mask=brain, aif_mask=aif_mask, settings=settings)
    tissue = ~aif_mask[0]
    names = ("cbf", "cbv", "mtt", "tmax")
    return [
        Estimate(**{name: float(np.median(getattr(maps, name)[z][tissue])) for name in names})
        for z in range(len(cases))
    ]
