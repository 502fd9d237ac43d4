"""The assembler refuses input that is not one complete CTP series, and says why."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ctp_node.errors import (
    IncompleteSeriesError,
    InvalidHeaderError,
    MixedGeometryError,
    MixedSeriesError,
    NotCTPError,
    UndecodableError,
)
from ctp_node.phantom import PhantomConfig, generate_phantom
from ctp_node.phantom.dicom_study import write_study
from ctp_node.phantom.sampling import parse_schedule, sample_study
from ctp_node.series import assemble
from ctp_node.series.assemble import assemble_series


@pytest.fixture(scope="module")
def small_study():
    return generate_phantom(PhantomConfig(matrix=64, slices=3, duration_s=16, noise_hu=4.0, seed=3))


@pytest.fixture
def written(small_study, tmp_path) -> list[Path]:
    """4 volumes x 3 slices, single-frame, GE-like profile."""
    series = sample_study(small_study, parse_schedule("every:4"))
    return write_study(series, tmp_path / "in", vendor="ge")


def _edit(path: Path, **attributes) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


def test_the_unmodified_files_assemble(written):
    series = assemble_series(written)
    assert series.hu.shape == (4, 3, 64, 64) and series.times_s.tolist() == [0.0, 4.0, 8.0, 12.0]


def test_incomplete_volume(written):
    with pytest.raises(IncompleteSeriesError, match="1 of 3 slice positions lack instances"):
        assemble_series([p for p in written if p.name != "IM_0002_001.dcm"])


def test_mixed_geometry(written):
    _edit(written[5], PixelSpacing=[0.5, 0.5])
    with pytest.raises(MixedGeometryError, match="must share one grid"):
        assemble_series(written)


def test_uneven_slices(written):
    for path in written:
        if path.name.endswith("_002.dcm"):
            ds = pydicom.dcmread(path)
            x, y, z = (float(v) for v in ds.ImagePositionPatient)
            _edit(path, ImagePositionPatient=[x, y, z + 2.0])
    with pytest.raises(MixedGeometryError, match="not evenly spaced"):
        assemble_series(written)


def test_single_time_point(written):
    with pytest.raises(NotCTPError, match="only one time point"):
        assemble_series([p for p in written if p.name.startswith("IM_0000_")])


def test_mixed_series(written):
    _edit(written[0], SeriesInstanceUID="1.2.3.4")
    with pytest.raises(MixedSeriesError, match="SeriesInstanceUID"):
        assemble_series(written)


def test_duplicate_instance_in_two_files(written, tmp_path):
    copy = tmp_path / "copy.dcm"
    copy.write_bytes(written[0].read_bytes())
    with pytest.raises(MixedSeriesError, match="remove the duplicate"):
        assemble_series([*written, copy])


def test_not_ct(written):
    _edit(written[3], Modality="MR")
    with pytest.raises(NotCTPError, match="not a CT image"):
        assemble_series(written)


def test_no_times(written):
    _edit(written[4], AcquisitionTime=None, ContentTime=None)
    with pytest.raises(NotCTPError, match="neither AcquisitionTime nor ContentTime"):
        assemble_series(written)


def test_interleaved_times(written):
    _edit(written[3], AcquisitionTime="080009")  # volume 1, slice 0 claims a time after volume 2 started
    with pytest.raises(MixedSeriesError, match="overlap in time"):
        assemble_series(written)


def test_not_dicom(written, tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("not a DICOM file")
    with pytest.raises(UndecodableError, match="notes.txt is not a readable DICOM file"):
        assemble_series([*written, junk])


def test_truncated_pixel_data(written):
    data = written[7].read_bytes()
    written[7].write_bytes(data[: len(data) - 3000])
    with pytest.raises(UndecodableError, match="IM_0002_001.dcm"):
        assemble_series(written)


def test_no_files():
    with pytest.raises(NotCTPError, match="no files"):
        assemble_series([])


def test_enhanced_order_follows_temporal_position_index(small_study, tmp_path):
    series = sample_study(small_study, parse_schedule("every:4"))
    paths = write_study(series, tmp_path, layout="enhanced")
    back = assemble_series(paths[::-1])
    assert np.array_equal(back.hu, np.rint(series.hu))
    ds = pydicom.dcmread(paths[1])
    ds.PerFrameFunctionalGroupsSequence[0].FrameContentSequence[0].TemporalPositionIndex = 3
    ds.save_as(paths[1])
    with pytest.raises(MixedSeriesError, match="mixes TemporalPositionIndex values \\[2, 3\\]"):
        assemble_series(paths)


# Issue 23 item 7: values the pipeline needs are checked at assembly, before any pixel is read or
# inpainted. Each of these used to pass, the series was inpainted in full, and then an output writer
# raised (a plain ValueError, retried three times) or the host ran out of memory (retried as transient).


def _no_pixels(path):
    raise AssertionError(f"pixels of {path} read: the header should have been refused first")


@pytest.mark.parametrize(
    ("keyword", "value"),
    [("StudyDate", "<b>x</b>"), ("StudyTime", "<b>x</b>"), ("PatientBirthDate", "20241301"), ("PatientSex", "<b>")],
)
def test_a_header_value_the_outputs_state_is_checked_at_assembly(written, monkeypatch, keyword, value):
    for path in written:
        _edit(path, **{keyword: value})
    monkeypatch.setattr(assemble, "_decode", _no_pixels)
    with pytest.raises(InvalidHeaderError, match=f"{keyword} {re.escape(repr(value))}"):
        assemble_series(written)


def test_an_unreadable_acquisition_date_fails_the_series_instead_of_ignoring_it(written):
    _edit(written[4], AcquisitionDate="<b>x</b>")
    with pytest.raises(InvalidHeaderError, match="unreadable date/time '<b>x</b>'"):
        assemble_series(written)


def test_a_matrix_beyond_the_ceiling_is_refused_before_any_pixels_are_read(written, monkeypatch):
    for path in written:
        _edit(path, Rows=65535, Columns=65535)
    monkeypatch.setattr(assemble, "_decode", _no_pixels)
    with pytest.raises(InvalidHeaderError, match="65535x65535.*max_matrix 1024"):
        assemble_series(written)  # the default ceiling: safe without configuration


def test_the_matrix_ceiling_is_configurable(written):
    from ctp_node.config import SeriesSettings

    assert SeriesSettings().max_matrix == assemble.DEFAULT_MAX_MATRIX  # [series] max_matrix
    with pytest.raises(InvalidHeaderError, match="64x64.*max_matrix 32"):
        assemble_series(written, max_matrix=32)
    assert assemble_series(written, max_matrix=64).hu.shape[2:] == (64, 64)


@pytest.mark.parametrize("rows", [0, None])
def test_a_missing_or_empty_matrix_is_an_input_fault(written, rows):
    for path in written:
        _edit(path, Rows=rows)
    with pytest.raises(InvalidHeaderError, match="Rows"):
        assemble_series(written)


def test_shifted_geometry_is_refused_for_what_it_is(written):
    """Issue 23 item 10: volumes 3 and 4 moved 1.3 mm along the table (their own slice positions) were
    refused as "volumes 1 and 2 overlap in time"."""
    for path in written:
        if int(path.stem.split("_")[1]) >= 2:
            ds = pydicom.dcmread(path)
            x, y, z = (float(v) for v in ds.ImagePositionPatient)
            _edit(path, ImagePositionPatient=[x, y, z + 1.3])
    with pytest.raises(MixedGeometryError, match="slice positions change during the series"):
        assemble_series(written)
