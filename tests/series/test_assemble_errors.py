"""The assembler refuses input that is not one complete CTP series, and says why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from ctp_node.errors import (
    IncompleteSeriesError,
    MixedGeometryError,
    MixedSeriesError,
    NotCTPError,
    UndecodableError,
)
from ctp_node.phantom import PhantomConfig, generate_phantom
from ctp_node.phantom.dicom_study import write_study
from ctp_node.phantom.sampling import parse_schedule, sample_study
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
