"""`CTPSeries`: one CT perfusion series as plain arrays, the currency between pipeline stages.

Produced by :func:`ctp_node.series.assemble.assemble_series` from DICOM instances (and by the phantom for
writing). Geometry follows the DICOM patient coordinate system (LPS, millimetres) and the SimpleITK
conventions, so resampling code can hand it to SimpleITK without reinterpretation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pydicom.dataset import Dataset


@dataclass
class CTPSeries:
    """A 4D CT perfusion series in Hounsfield units.

    Attributes:
        hu: float32 (T, Z, Y, X) HU; volume t, slice z (increasing along ``direction[:, 2]``),
            row y, column x.
        times_s: float64 (T,) acquisition time of each volume in seconds relative to the first
            volume (so ``times_s[0] == 0``), strictly increasing.
        origin: (x, y, z) mm, patient position of voxel (z=0, y=0, x=0) (ImagePositionPatient).
        spacing_mm: (z, y, x) mm: distance between slice centres, between rows, between columns.
        direction: 3x3; columns are the patient-space unit vectors of increasing x (column index),
            y (row index) and z (slice index), as in SimpleITK's ``GetDirection()``.
        sop_instance_uids: per volume, the SOPInstanceUIDs the volume was read from (one per slice
            for single-frame input, one per file for multi-frame input); empty when not from DICOM.
        study_uid, series_uid, frame_of_reference_uid: the source identifiers ('' if unknown).
        start: absolute date/time of the first volume when the source states one (None otherwise);
            needed to write times back as DICOM AcquisitionTime/ContentTime.
        header: the header (no pixels) of the first source instance, read once by the assembler:
            the template of the patient, study and acquisition attributes of a derived series; None
            when not from DICOM.
        slice_times_s: float64 (T, Z) the time of each slice itself, in seconds after ``start``
            (a scanner may acquire the slices of a volume one after the other, each with its own
            AcquisitionTime; ``times_s`` is the earliest of them); None when not from DICOM.
        warnings: what the assembler accepted but the job should state (e.g. acquisition times that
            run backwards against the instance numbers: the volumes are in the order of their times).
    """

    hu: np.ndarray
    times_s: np.ndarray
    origin: tuple[float, float, float]
    spacing_mm: tuple[float, float, float]
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    sop_instance_uids: list[tuple[str, ...]] = field(default_factory=list)
    study_uid: str = ""
    series_uid: str = ""
    frame_of_reference_uid: str = ""
    start: datetime | None = None
    header: Dataset | None = field(default=None, repr=False, compare=False)
    slice_times_s: np.ndarray | None = field(default=None, repr=False, compare=False)
    warnings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.hu.ndim != 4:
            raise ValueError(f"hu must be (T, Z, Y, X), got shape {self.hu.shape}")
        if self.times_s.shape != (self.hu.shape[0],):
            raise ValueError(f"times_s has shape {self.times_s.shape}, expected ({self.hu.shape[0]},)")
        if self.times_s.size > 1 and not np.all(np.diff(self.times_s) > 0):
            raise ValueError("times_s must be strictly increasing")
        if np.asarray(self.direction).shape != (3, 3):
            raise ValueError("direction must be a 3x3 matrix")
        if self.slice_times_s is not None and np.shape(self.slice_times_s) != self.hu.shape[:2]:
            raise ValueError(f"slice_times_s has shape {np.shape(self.slice_times_s)}, expected {self.hu.shape[:2]}")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(T, Z, Y, X)."""
        return tuple(self.hu.shape)  # type: ignore[return-value]

    def slice_position(self, z: int) -> np.ndarray:
        """Patient position (x, y, z) mm of the first voxel of slice ``z``."""
        return np.asarray(self.origin, dtype=np.float64) + z * self.spacing_mm[0] * np.asarray(self.direction)[:, 2]
