"""DICOM encodings any writer of this node uses: reproducible UIDs, DA/TM/DT strings, the pixel format.

The writer of the synthetic series (ctp_node/series/derived.py) and the phantom's writers both use
these; they live with the series so that clinical output never depends on the test-data generator.
What only the node's own output says (its equipment, the research caution, code items) is
ctp_node/series/node_dicom.py.
UIDs are derived deterministically from a seed, so writing the same series twice gives the same UIDs
(reproducible tests, idempotent sends).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid


def derived_uid(*parts: object) -> str:
    """A UID hashed from ``parts``; joined with a separator, since pydicom concatenates entropy
    sources as they are and (1, 10) would otherwise collide with (11, 0)."""
    return generate_uid(entropy_srcs=["|".join(str(p) for p in parts)])


@dataclass(frozen=True)
class StudyUIDs:
    """Identifiers of one written series; ``instance(*parts)`` gives a SOPInstanceUID per instance."""

    study: str
    series: str
    frame_of_reference: str
    seed: str

    @classmethod
    def derived(cls, seed: str, study: str = "", series: str = "", frame_of_reference: str = "") -> StudyUIDs:
        """Keep given UIDs; derive missing ones from ``seed``."""
        return cls(
            study or derived_uid(seed, "study"),
            series or derived_uid(seed, "series"),
            frame_of_reference or derived_uid(seed, "frame-of-reference"),
            seed,
        )

    def instance(self, *parts: object) -> str:
        return derived_uid(self.seed, self.series, *parts)

    def dimension_organisation(self) -> str:
        return derived_uid(self.seed, self.series, "dimension-organisation")


def dicom_date(moment: datetime) -> str:
    """DA: YYYYMMDD."""
    return moment.strftime("%Y%m%d")


def dicom_time(moment: datetime, decimals: int = 6) -> str:
    """TM rounded (not truncated) to ``decimals`` fractional digits."""
    quantum = 10 ** (6 - decimals)
    micro = round(moment.microsecond / quantum) * quantum
    moment = moment.replace(microsecond=0) + timedelta(microseconds=micro)
    return moment.strftime("%H%M%S") + ("." + f"{moment.microsecond:06d}"[:decimals] if decimals else "")


def dicom_datetime(moment: datetime) -> str:
    """DT with microseconds, without a UTC offset."""
    return moment.strftime("%Y%m%d%H%M%S.%f")


def pixel_format(ds: Dataset, rows: int, columns: int, signed: bool, bits_stored: int) -> None:
    """Image Pixel module attributes for 16-bit monochrome CT."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
