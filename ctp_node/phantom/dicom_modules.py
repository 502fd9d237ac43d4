"""DICOM attributes shared by the phantom's writers: identities, common modules, pixel encoding.

Values that identify a patient are obviously synthetic (PatientName "PHANTOM^CTP") so a phantom
study can never be mistaken for a patient's in a PACS. UIDs, dates and times and the pixel format
are encoded as the node's own writer encodes them (ctp_node/series/dicom_attributes.py).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from ctp_node import __version__
from ctp_node.phantom.dicom_profiles import VendorProfile
from ctp_node.phantom.sampling import SCAN_START
from ctp_node.series import CTPSeries
from ctp_node.series.dicom_attributes import StudyUIDs, dicom_date, dicom_time, pixel_format

RESCALE_INTERCEPT = -1024.0
RESCALE_SLOPE = 1.0
KVP = 80.0


def patient_study_series(ds: Dataset, uids: StudyUIDs, start: datetime, series_description: str) -> None:
    """Patient, General Study, General/CT Series, Frame of Reference and SOP Common attributes."""
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "PHANTOM^CTP"
    ds.PatientID = "CTP-PHANTOM"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "Synthetic data: digital CTP phantom, no patient"
    ds.StudyInstanceUID = uids.study
    ds.StudyDate = dicom_date(start)
    ds.StudyTime = dicom_time(start, 0)
    ds.ReferringPhysicianName = ""
    ds.StudyID = "PHANTOM"
    ds.AccessionNumber = ""
    ds.StudyDescription = "Synthetic CT perfusion phantom"
    ds.Modality = "CT"
    ds.SeriesInstanceUID = uids.series
    ds.SeriesNumber = 1
    ds.SeriesDate = dicom_date(start)
    ds.SeriesTime = dicom_time(start, 0)
    ds.SeriesDescription = series_description
    ds.BodyPartExamined = "HEAD"
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = uids.frame_of_reference
    ds.PositionReferenceIndicator = ""


def equipment(ds: Dataset, model_name: str) -> None:
    """(Enhanced) General Equipment: clearly a simulator, named after the vendor profile it mimics."""
    ds.Manufacturer = "CTP-NODE PHANTOM"
    ds.ManufacturerModelName = model_name
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = f"ctp-node {__version__}"
    ds.InstitutionName = "Synthetic"


def check_pixel_range(hu: np.ndarray, signed: bool, bits_stored: int) -> None:
    """ValueError if some ``round(HU)`` does not fit the pixel format: the writer never clips silently."""
    low, high = _stored_range(signed, bits_stored)
    if hu.size == 0:
        return
    lowest, highest = float(np.rint(np.min(hu))), float(np.rint(np.max(hu)))
    if lowest - RESCALE_INTERCEPT < low or highest - RESCALE_INTERCEPT > high:
        raise ValueError(
            f"HU {lowest:g}..{highest:g} do not fit {bits_stored}-bit {'signed' if signed else 'unsigned'} "
            f"pixels with intercept {RESCALE_INTERCEPT:g} (allowed {low + RESCALE_INTERCEPT:g}.."
            f"{high + RESCALE_INTERCEPT:g} HU); clip the series first or choose a vendor profile with more bits"
        )


def stored_values(hu: np.ndarray, signed: bool, bits_stored: int) -> np.ndarray:
    """HU -> stored integers ``round(HU) - intercept`` (slope 1; halves round to even), range-checked."""
    check_pixel_range(hu, signed, bits_stored)
    return (np.rint(hu) - np.float32(RESCALE_INTERCEPT)).astype(np.int16 if signed else np.uint16)


def _stored_range(signed: bool, bits_stored: int) -> tuple[int, int]:
    return (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1) if signed else (0, 2**bits_stored - 1)


def volume_times(series: CTPSeries) -> list[datetime]:
    """Absolute time of each volume (the series start defaults to the synthetic scan start)."""
    start = series.start or SCAN_START
    return [start + timedelta(seconds=float(t)) for t in series.times_s]


def save_instance(ds: Dataset, path: Path, syntax: str, pixels: np.ndarray) -> None:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    if syntax == RLELossless:
        ds.compress(RLELossless, pixels, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)


def base_dataset(series: CTPSeries, uids: StudyUIDs, profile: VendorProfile, sop_class: str, layout: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    start = volume_times(series)[0]
    patient_study_series(ds, uids, start, f"CTP phantom {layout} {profile.name}-like (simulated)")
    equipment(ds, profile.model_name)
    _, _, rows, columns = series.hu.shape
    pixel_format(ds, rows, columns, profile.signed, profile.bits_stored)
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    return ds


def ds_string(value: float) -> str:
    """A DS string with at most 16 characters (enough for 0.001 mm)."""
    return f"{float(value):.6f}".rstrip("0").rstrip(".")[:16] or "0"


def item(**attributes: object) -> Dataset:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds
