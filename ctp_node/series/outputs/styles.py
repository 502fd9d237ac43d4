"""How each perfusion map is named, coded, stored and shown (one table, used by every writer)."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.sr.coding import Code


@dataclass(frozen=True)
class MapStyle:
    name: str  # key in PerfusionAnalysis: "cbf", ...
    title: str  # "CBF"
    unit: str  # as people write it
    ucum: Code  # the unit, for machines (RealWorldValueMapping, SR)
    concept: Code  # what the value is (DICOM perfusion codes, CID 7180 / 7263)
    slope: float  # quantitative map: value = stored * slope (signed 16-bit)
    low: float  # display range: window and colour scale
    high: float
    colormap: str = "jet"


# Display ranges: fixed, so that every study looks the same in PACS; Tmax 0-12 s puts 6 s mid-scale.
MAP_STYLES: dict[str, MapStyle] = {
    "cbf": MapStyle(
        "cbf", "CBF", "mL/100 g/min", Code("ml/[100]g/min", "UCUM", "milliliter per 100 gram per minute"),
        Code("113055", "DCM", "Regional Cerebral Blood Flow"), 0.1, 0.0, 80.0,
    ),
    "cbv": MapStyle(
        "cbv", "CBV", "mL/100 g", Code("ml/[100]g", "UCUM", "milliliter per 100 gram"),
        Code("113056", "DCM", "Regional Cerebral Blood Volume"), 0.01, 0.0, 6.0,
    ),
    "mtt": MapStyle(
        "mtt", "MTT", "s", Code("s", "UCUM", "second"), Code("113052", "DCM", "Mean Transit Time"), 0.01, 0.0, 16.0,
    ),
    "tmax": MapStyle(
        "tmax", "Tmax", "s", Code("s", "UCUM", "second"), Code("113084", "DCM", "Tmax"), 0.01, 0.0, 12.0,
    ),
}  # fmt: skip
