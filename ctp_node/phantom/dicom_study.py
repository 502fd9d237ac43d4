"""Write a 4D HU series as CT perfusion DICOM studies the way scanners send them.

Layouts:
- ``single-frame``: CT Image Storage, one instance per slice per time point. Vendor profiles vary
  which tags carry the timing, as real scanners do (see ``PROFILES``).
- ``enhanced``: Enhanced CT Image Storage, one multi-frame instance per time point, with per-frame
  Frame Content (FrameAcquisitionDateTime, TemporalPositionIndex, StackID, InStackPositionNumber,
  DimensionIndexValues) and Plane Position, orientation/pixel measures in shared groups, and a
  dimension organisation (stack, in-stack position, temporal position).

Pixels: 16-bit integers, RescaleIntercept -1024, RescaleSlope 1, i.e. HU rounded to integers.
Transfer syntaxes: Explicit VR Little Endian, JPEG Lossless SV1 (via DCMTK dcmcjpeg, see
``jpeg_lossless``) and RLE Lossless (pydicom with the pylibjpeg-rle encoder). Timing: the time of
volume t is ``series.start + series.times_s[t]``, written to the profile's precision (TM to 1 ms
or 1 us; DT to 1 us).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from ctp_node.phantom import jpeg_lossless
from ctp_node.phantom.dicom_enhanced import write_enhanced
from ctp_node.phantom.dicom_modules import check_pixel_range, volume_times
from ctp_node.phantom.dicom_profiles import PROFILES, VendorProfile
from ctp_node.phantom.dicom_single_frame import write_single_frame
from ctp_node.series import CTPSeries
from ctp_node.series.dicom_attributes import StudyUIDs

if TYPE_CHECKING:  # the type only: model's package would load torch
    from model.progress import ProgressFn

__all__ = ["LAYOUTS", "PROFILES", "TRANSFER_SYNTAXES", "VendorProfile", "volume_times", "write_study"]

Layout = Literal["single-frame", "enhanced"]
LAYOUTS: tuple[str, ...] = ("single-frame", "enhanced")
TRANSFER_SYNTAXES: dict[str, str] = {
    "explicit": ExplicitVRLittleEndian,
    "jpeg-lossless": jpeg_lossless.JPEG_LOSSLESS_SV1,
    "rle": RLELossless,
}


def write_study(
    series: CTPSeries,
    out_dir: Path,
    *,
    layout: str = "single-frame",
    vendor: str = "ge",
    transfer_syntax: str = "explicit",
    uid_seed: str = "ctp-phantom",
    progress: ProgressFn | None = None,
) -> list[Path]:
    """Write ``series`` into ``out_dir`` (created) and return the written files in volume order.

    UIDs missing from ``series`` are derived from ``uid_seed``; ``series.start`` (default: a
    synthetic 2000-01-01 08:00) is the time of the first volume. ``progress(done, total)`` is called
    as instances are written (and again while they are JPEG-compressed).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; use one of {LAYOUTS}")
    if vendor not in PROFILES:
        raise ValueError(f"unknown vendor profile {vendor!r}; use one of {tuple(PROFILES)}")
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"unknown transfer syntax {transfer_syntax!r}; use one of {tuple(TRANSFER_SYNTAXES)}")
    if not np.allclose(series.direction, np.eye(3)):
        raise ValueError("the phantom writers support axial series only (direction = identity)")
    syntax = TRANSFER_SYNTAXES[transfer_syntax]
    if syntax == jpeg_lossless.JPEG_LOSSLESS_SV1:
        jpeg_lossless.dcmcjpeg_path()  # fail before writing anything
    profile = PROFILES[vendor]
    check_pixel_range(series.hu, profile.signed, profile.bits_stored)  # before any file is written
    uids = StudyUIDs.derived(uid_seed, series.study_uid, series.series_uid, series.frame_of_reference_uid)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = progress or (lambda done, total: None)
    native = RLELossless if syntax == RLELossless else ExplicitVRLittleEndian
    if layout == "single-frame":
        paths = write_single_frame(series, out_dir, profile, uids, native, report)
    else:
        paths = write_enhanced(series, out_dir, profile, uids, native, report)
    if syntax == jpeg_lossless.JPEG_LOSSLESS_SV1:
        with ThreadPoolExecutor(max_workers=2) as pool:
            for done, _ in enumerate(pool.map(jpeg_lossless.compress_in_place, paths), start=1):
                report(done, len(paths))
    return paths
