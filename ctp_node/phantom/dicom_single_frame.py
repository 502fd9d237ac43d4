"""Single-frame CT Image Storage: one instance per slice per time point, timing per vendor profile."""

from __future__ import annotations

import copy
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage

from ctp_node.phantom.dicom_modules import (
    KVP,
    RESCALE_INTERCEPT,
    RESCALE_SLOPE,
    base_dataset,
    ds_string,
    save_instance,
    stored_values,
    volume_times,
)
from ctp_node.phantom.dicom_profiles import VendorProfile
from ctp_node.series import CTPSeries
from ctp_node.series.dicom_attributes import StudyUIDs, dicom_date, dicom_time

if TYPE_CHECKING:  # the type only: model's package would load torch
    from model.progress import ProgressFn


def write_single_frame(
    series: CTPSeries,
    out_dir: Path,
    profile: VendorProfile,
    uids: StudyUIDs,
    syntax: str,
    progress: ProgressFn,
) -> list[Path]:
    """Write T x Z instances named IM_<volume>_<slice>.dcm; ``syntax`` is Explicit VR LE or RLE."""
    n_t, n_z = series.hu.shape[:2]
    base = base_dataset(series, uids, profile, CTImageStorage, "single-frame")
    times = volume_times(series)
    spacing_z, spacing_y, spacing_x = series.spacing_mm
    base.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    base.PixelSpacing = [ds_string(spacing_y), ds_string(spacing_x)]
    base.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    base.SliceThickness = ds_string(spacing_z)
    base.RescaleIntercept = ds_string(RESCALE_INTERCEPT)
    base.RescaleSlope = ds_string(RESCALE_SLOPE)
    base.RescaleType = "HU"
    base.KVP = ds_string(KVP)
    base.ReconstructionDiameter = ds_string(spacing_x * series.hu.shape[3])
    base.ConvolutionKernel = "STANDARD"
    base.ContrastBolusAgent = "IODINATED CONTRAST (SIMULATED)"
    base.ContrastBolusRoute = "IV"
    base.WindowCenter = "40"
    base.WindowWidth = "80"
    paths = []
    for t in range(n_t):
        for z in range(n_z):
            ds = copy.deepcopy(base)
            ds.SOPInstanceUID = uids.instance("single-frame", t, z)
            ds.InstanceNumber = t * n_z + z + 1 if profile.instance_number == "global" else z + 1
            _single_frame_timing(ds, profile, times[0], times[t], t)
            position = series.slice_position(z)
            ds.ImagePositionPatient = [ds_string(v) for v in position]
            ds.SliceLocation = ds_string(position[2])
            path = out_dir / f"IM_{t:04d}_{z:03d}.dcm"
            save_instance(ds, path, syntax, stored_values(series.hu[t, z], profile.signed, profile.bits_stored))
            paths.append(path)
        progress((t + 1) * n_z, n_t * n_z)
    return paths


def _single_frame_timing(ds: Dataset, profile: VendorProfile, start: datetime, moment: datetime, t: int) -> None:
    for prefix, rule in (("Acquisition", profile.acquisition_time), ("Content", profile.content_time)):
        if rule is None:
            continue
        when = moment if rule == "volume" else start
        setattr(ds, f"{prefix}Date", dicom_date(when))
        setattr(ds, f"{prefix}Time", dicom_time(when, profile.time_decimals))
    if profile.acquisition_number == "volume":
        ds.AcquisitionNumber = t + 1
    elif profile.acquisition_number == "constant":
        ds.AcquisitionNumber = 1
    else:
        ds.AcquisitionNumber = None
