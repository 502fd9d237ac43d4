"""Vendor-like profiles: which DICOM tags a scanner fills for a CTP series, and how.

Real single-frame CTP differs between scanners in where the timing lives (AcquisitionTime,
ContentTime, AcquisitionNumber) and in the pixel format; the assembler must cope with all of them,
so the phantom writes each. Names say "-like": the files never claim to come from a real vendor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class VendorProfile:
    """Which tags a scanner fills, and how (single-frame layout; enhanced uses the pixel format).

    acquisition_time / content_time: "volume" (time of the volume), "series" (one time for the
    whole series, useless for ordering, as some scanners write the reconstruction time) or None
    (tag absent). acquisition_number: "volume" (1, 2, ... per time point), "constant" (1) or
    "empty" (present, zero length). instance_number: "global" (1..T*Z) or "per-volume" (1..Z).
    """

    name: str
    model_name: str
    signed: bool
    bits_stored: int
    acquisition_time: Literal["volume", "series"] | None
    content_time: Literal["volume", "series"] | None
    acquisition_number: Literal["volume", "constant", "empty"]
    instance_number: Literal["global", "per-volume"]
    time_decimals: int


PROFILES: dict[str, VendorProfile] = {
    "ge": VendorProfile("ge", "GE-LIKE CTP", True, 16, "volume", "volume", "volume", "global", 6),
    "siemens": VendorProfile("siemens", "SIEMENS-LIKE CTP", False, 12, "volume", "series", "constant", "per-volume", 6),
    "content-time": VendorProfile(
        "content-time", "CONTENT-TIME-ONLY CTP", False, 16, None, "volume", "empty", "global", 3
    ),
}
