"""Every writer layout x sampling schedule x transfer syntax round-trips and passes dciodvfy."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest

from ctp_node.phantom.dicom_study import write_study
from ctp_node.phantom.sampling import SCAN_START, parse_schedule, sample_study
from ctp_node.series.assemble import assemble_series
from tests.dciodvfy import dciodvfy_errors, dciodvfy_report

WRITERS = [("single-frame", "ge"), ("single-frame", "siemens"), ("single-frame", "content-time"), ("enhanced", "ge")]
SCHEDULES = [("every:4", ()), ("irregular:1.5@6,3", (2,)), ("times:0,1.5,3.2,7.25,15", (0,))]
SYNTAXES = {
    "explicit": "1.2.840.10008.1.2.1",
    "jpeg-lossless": "1.2.840.10008.1.2.4.70",
    "rle": "1.2.840.10008.1.2.5",
}
TIME_TOLERANCE_S = 0.0005  # TM written to 1 ms (content-time profile) or 1 us: rounding, not truncation


@pytest.mark.parametrize("syntax", list(SYNTAXES))
@pytest.mark.parametrize(("spec", "drop"), SCHEDULES)
@pytest.mark.parametrize(("layout", "vendor"), WRITERS)
def test_round_trip(small_study, tmp_path, layout, vendor, spec, drop, syntax):
    if syntax == "jpeg-lossless" and shutil.which("dcmcjpeg") is None:
        pytest.skip("dcmcjpeg (DCMTK) is not installed; CI installs it")
    series = sample_study(small_study, parse_schedule(spec, drop))
    paths = write_study(series, tmp_path, layout=layout, vendor=vendor, transfer_syntax=syntax)
    n_t, n_z = series.hu.shape[:2]
    assert len(paths) == (n_t * n_z if layout == "single-frame" else n_t)

    back = assemble_series(sorted(tmp_path.iterdir(), key=lambda p: p.name[::-1]))  # order must not matter
    assert np.array_equal(back.hu, np.rint(series.hu)), "pixel values differ after integer HU rounding"
    assert np.abs(back.times_s - series.times_s).max() <= TIME_TOLERANCE_S
    assert back.start == series.start and back.start >= SCAN_START
    assert back.spacing_mm == pytest.approx(small_study.spacing_mm)
    assert back.origin == pytest.approx(small_study.origin_mm)
    np.testing.assert_allclose(back.direction, np.eye(3))
    assert len(back.sop_instance_uids) == n_t
    assert all(len(v) == (n_z if layout == "single-frame" else 1) for v in back.sop_instance_uids)

    first = pydicom.dcmread(paths[0])
    assert first.file_meta.TransferSyntaxUID == SYNTAXES[syntax]
    assert str(first.PatientName) == "PHANTOM^CTP" and float(first.get("KVP", 80)) == 80.0
    assert back.study_uid == first.StudyInstanceUID and back.series_uid == first.SeriesInstanceUID
    assert back.frame_of_reference_uid == first.FrameOfReferenceUID
    assert dciodvfy_errors(paths[0]) == []
    assert dciodvfy_errors(paths[-1]) == []


def test_writing_twice_gives_the_same_uids(small_study, tmp_path):
    series = sample_study(small_study, parse_schedule("every:8"))
    a = write_study(series, tmp_path / "a")
    b = write_study(series, tmp_path / "b")
    uids = [(pydicom.dcmread(x).SOPInstanceUID, pydicom.dcmread(y).SOPInstanceUID) for x, y in zip(a, b, strict=True)]
    assert all(x == y for x, y in uids) and len({x for x, _ in uids}) == len(uids)


def test_instance_uids_do_not_collide_across_volumes_and_slices():
    from ctp_node.series.dicom_attributes import StudyUIDs

    uids = StudyUIDs.derived("seed")
    made = {uids.instance("single-frame", t, z) for t in range(61) for z in range(16)}
    assert len(made) == 61 * 16
    assert uids.instance("single-frame", 1, 10) != uids.instance("single-frame", 11, 0)


def test_vendor_profiles_fill_timing_tags_differently(small_study, tmp_path):
    series = sample_study(small_study, parse_schedule("every:8"))
    headers = {}
    for vendor in ("ge", "siemens", "content-time"):
        path = write_study(series, tmp_path / vendor, vendor=vendor)[-1]
        headers[vendor] = pydicom.dcmread(path)
    assert headers["ge"].AcquisitionNumber == 2 and headers["ge"].AcquisitionTime == "080008.000000"
    assert headers["siemens"].AcquisitionNumber == 1 and headers["siemens"].ContentTime == "080000.000000"
    assert headers["siemens"].BitsStored == 12 and headers["siemens"].PixelRepresentation == 0
    assert "AcquisitionTime" not in headers["content-time"] and headers["content-time"].ContentTime == "080008.000"
    assert headers["content-time"].AcquisitionNumber is None


def test_enhanced_frame_content(small_study, tmp_path):
    series = sample_study(small_study, parse_schedule("every:8"))
    path = write_study(series, tmp_path, layout="enhanced")[1]
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2.1" and ds.NumberOfFrames == 3
    content = ds.PerFrameFunctionalGroupsSequence[2].FrameContentSequence[0]
    assert content.TemporalPositionIndex == 2 and content.InStackPositionNumber == 3 and content.StackID == "1"
    assert list(content.DimensionIndexValues) == [1, 3, 2]
    assert content.FrameAcquisitionDateTime == "20000101080008.000000"
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [3.75, 3.75]
    assert len(ds.DimensionIndexSequence) == 3


def test_dciodvfy_warnings_are_the_known_ones(small_study, tmp_path):
    """Single-frame: no warnings. Enhanced: only the zero table speed/feed/pitch of a stationary cine scan."""
    series = sample_study(small_study, parse_schedule("every:8"))
    single = write_study(series, tmp_path / "sf")[0]
    assert [line for line in dciodvfy_report(single) if line.startswith(("Error", "Warning"))] == []
    enhanced = write_study(series, tmp_path / "en", layout="enhanced")[0]
    warnings = [line for line in dciodvfy_report(enhanced) if line.startswith("Warning")]
    assert warnings and all("Value is zero" in w and ("Table" in w or "Spiral Pitch" in w) for w in warnings)


def test_values_outside_the_pixel_range_are_refused(small_study, tmp_path):
    series = sample_study(small_study, parse_schedule("every:8"))
    series.hu[0, 0, 0, 0] = 3500.0  # does not fit 12 bits with intercept -1024
    with pytest.raises(ValueError, match="do not fit 12-bit"):
        write_study(series, tmp_path, vendor="siemens")
    assert not any(tmp_path.iterdir())


def test_unknown_writer_options_are_refused(small_study, tmp_path):
    series = sample_study(small_study, parse_schedule("every:8"))
    for kwargs, message in [
        ({"layout": "mosaic"}, "unknown layout"),
        ({"vendor": "acme"}, "unknown vendor"),
        ({"transfer_syntax": "jpeg2000"}, "unknown transfer syntax"),
    ]:
        with pytest.raises(ValueError, match=message):
            write_study(series, tmp_path, **kwargs)


def test_missing_jpeg_encoder_is_reported_clearly(small_study, tmp_path, monkeypatch):
    from ctp_node.phantom import jpeg_lossless

    monkeypatch.setattr(jpeg_lossless.shutil, "which", lambda name: None)
    series = sample_study(small_study, parse_schedule("every:8"))
    with pytest.raises(jpeg_lossless.EncoderMissingError, match="apt-get install dcmtk"):
        write_study(series, tmp_path, transfer_syntax="jpeg-lossless")
