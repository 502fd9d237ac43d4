"""Tissue classes of the digital head and their perfusion and baseline values.

Perfusion values are those of the often used digital brain perfusion phantom described in
docs/ctp-data.md (grey/white matter, penumbra-like and core-like tissue); baseline HU as measured on
80 kVp CTP. Keeping them in one table lets tests and the truth maps refer to the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class TissueLabel(IntEnum):
    """Voxel classes of ``PerfusionTruth.labels`` (uint8)."""

    AIR = 0
    SOFT_TISSUE = 1  # scalp; not perfused in the phantom
    BONE = 2  # skull, > 300 HU
    CSF = 3  # subarachnoid space, sulci, fissures, ventricles
    GREY_MATTER = 4
    WHITE_MATTER = 5
    ARTERY = 6  # ICA, MCA and ACA segments
    VEIN = 7  # dural venous sinuses
    GM_PENUMBRA = 8  # hypoperfused grey matter
    WM_PENUMBRA = 9
    GM_CORE = 10  # severely reduced flow grey matter
    WM_CORE = 11


@dataclass(frozen=True)
class Perfusion:
    """Class values: CBF mL/100 g/min, MTT s, bolus delay s (CBV follows as CBF * MTT / 60)."""

    cbf: float
    mtt: float
    delay: float

    @property
    def cbv(self) -> float:
        """mL/100 g, from the central volume principle."""
        return self.cbf * self.mtt / 60.0


PERFUSION: dict[TissueLabel, Perfusion] = {
    TissueLabel.GREY_MATTER: Perfusion(cbf=53.0, mtt=3.7, delay=1.0),
    TissueLabel.WHITE_MATTER: Perfusion(cbf=25.0, mtt=4.6, delay=1.0),
    TissueLabel.GM_PENUMBRA: Perfusion(cbf=16.0, mtt=11.3, delay=4.0),
    TissueLabel.WM_PENUMBRA: Perfusion(cbf=7.5, mtt=13.6, delay=8.0),
    TissueLabel.GM_CORE: Perfusion(cbf=5.3, mtt=8.0, delay=9.0),
    TissueLabel.WM_CORE: Perfusion(cbf=2.5, mtt=10.1, delay=12.0),
}
"""Perfused classes (parenchyma). Other classes have no perfusion truth (maps are 0 there)."""

BASELINE_HU: dict[TissueLabel, float] = {
    TissueLabel.AIR: -1000.0,
    TissueLabel.SOFT_TISSUE: 40.0,
    TissueLabel.BONE: 1000.0,
    TissueLabel.CSF: 12.0,
    TissueLabel.GREY_MATTER: 35.0,
    TissueLabel.WHITE_MATTER: 29.0,
    TissueLabel.ARTERY: 40.0,
    TissueLabel.VEIN: 40.0,
    TissueLabel.GM_PENUMBRA: 35.0,
    TissueLabel.WM_PENUMBRA: 29.0,
    TissueLabel.GM_CORE: 35.0,
    TissueLabel.WM_CORE: 29.0,
}
"""Unenhanced HU per class (GM 35, WM 29, vessels 40, CSF 12; skull well above 300 HU)."""

CORE_LABELS = (TissueLabel.GM_CORE, TissueLabel.WM_CORE)
PENUMBRA_LABELS = (TissueLabel.GM_PENUMBRA, TissueLabel.WM_PENUMBRA)
PARENCHYMA_LABELS = tuple(PERFUSION)
INTRACRANIAL_LABELS = (TissueLabel.CSF, TissueLabel.ARTERY, TissueLabel.VEIN, *PARENCHYMA_LABELS)
"""Everything inside the inner table of the skull: the phantom's brain mask (skull-stripped head)."""

K_HAEMATOCRIT_DENSITY = (1 - 0.45) / (1 - 0.25) / 1.05
"""k of the perfusion analysis (docs/ctp-data.md): large-vessel vs capillary haematocrit and brain
density. Tissue enhancement is ``CBF / 6000 / k * (AIF conv R)`` so that the standard analysis
(``CBF = k * max(R) * 6000``) recovers the truth; it is why peak GM enhancement is about 19 HU."""
