"""write_derived_series: the 1 s series as marked, valid, deterministic derived DICOM."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ctp_node import __version__
from ctp_node.assemble import assemble_series
from ctp_node.derived import (
    PATIENT_STUDY_KEYWORDS,
    DerivedRecipe,
    DerivedSeriesError,
    write_derived_series,
)
from ctp_node.grid import from_model_grid, to_model_grid
from ctp_node.phantom.dicom_study import write_study
from ctp_node.phantom.sampling import SCAN_START, parse_schedule, sample_study
from tests.pipeline.conftest import dciodvfy_errors

RECIPE = DerivedRecipe(
    model_name="bae2024-ctp-inpainting",
    model_version="1.0",
    checkpoint_id="sha256:0123456789abcdef",
    sampler="dpmpp_2m",
    steps=20,
)
SECONDS = np.arange(9.0)
SYNTHETIC = SECONDS % 4 != 0  # acquired at 0, 4, 8 s


def _hu_1s(case) -> np.ndarray:
    """The phantom's 1 s truth with the acquired seconds exactly as read from DICOM."""
    hu = case.study.hu.copy()
    hu[[0, 4, 8]] = case.series.hu
    return hu


def _write(case, out: Path, recipe: DerivedRecipe = RECIPE, **changes):
    args = {
        "hu_1s": _hu_1s(case),
        "grid_times_s": SECONDS,
        "synthetic_mask": SYNTHETIC,
        "source": case.series,
        "source_files": case.files,
    }
    args.update(changes)
    return write_derived_series(out_dir=out, recipe=recipe, **args)


@pytest.fixture(scope="module")
def written(small_head, tmp_path_factory):
    out = tmp_path_factory.mktemp("derived")
    result = _write(small_head, out)
    return result, [pydicom.dcmread(p) for p in result.paths]


def test_one_instance_per_slice_per_second(written, small_head):
    result, datasets = written
    assert result.count == 9 * 3 == len(datasets)
    assert sorted(p.name for p in result.paths[:3]) == [
        "CTP1S_0000_000.dcm",
        "CTP1S_0000_001.dcm",
        "CTP1S_0000_002.dcm",
    ]
    assert sorted(p.name for p in result.paths[0].parent.iterdir()) == sorted(p.name for p in result.paths)  # no temp
    assert result.synthetic_seconds == (1.0, 2.0, 3.0, 5.0, 6.0, 7.0)
    assert result.clipped_voxels == 0
    assert [ds.InstanceNumber for ds in datasets] == list(range(1, 28))


def test_every_file_passes_dciodvfy(written):
    result, _ = written
    for path in result.paths:
        assert dciodvfy_errors(path) == [], path.name


def test_identity_study_frame_of_reference_and_series(written, small_head):
    result, datasets = written
    source = pydicom.dcmread(small_head.files[0])
    assert {ds.StudyInstanceUID for ds in datasets} == {source.StudyInstanceUID}
    assert {ds.FrameOfReferenceUID for ds in datasets} == {source.FrameOfReferenceUID}
    assert {ds.SeriesInstanceUID for ds in datasets} == {result.series_uid}
    assert result.series_uid != source.SeriesInstanceUID
    assert len({ds.SOPInstanceUID for ds in datasets}) == 27
    assert not {ds.SOPInstanceUID for ds in datasets} & {u for v in small_head.series.sop_instance_uids for u in v}
    assert {ds.SeriesNumber for ds in datasets} == {source.SeriesNumber + 1000} == {result.series_number}
    description = datasets[0].SeriesDescription
    assert "SYNTHETIC" in description and "RESEARCH" in description and len(description) <= 64


def test_patient_and_study_attributes_are_copied_unchanged(written, small_head):
    _, datasets = written
    source = pydicom.dcmread(small_head.files[0])
    copied = [k for k in PATIENT_STUDY_KEYWORDS if k in source]
    assert {"PatientName", "PatientID", "StudyDate", "StudyID", "SpecificCharacterSet"} <= set(copied)
    for ds in (datasets[0], datasets[-1]):
        for keyword in copied:
            assert ds[keyword].value == source[keyword].value, keyword


def test_image_type_marks_synthetic_and_acquired_seconds(written):
    _, datasets = written
    for ds in datasets:
        second = ds.TemporalPositionIdentifier - 1
        if second % 4 == 0:
            assert list(ds.ImageType) == ["DERIVED", "PRIMARY", "AXIAL"]
            assert ds.ImageComments.startswith("ACQUIRED")
        else:
            assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
            assert ds.ImageComments.startswith("SYNTHETIC")
        assert "CAUTION: Not for Diagnostic Use" in ds.ImageComments


def test_times_are_one_second_apart_from_the_source_start(written, small_head):
    _, datasets = written
    start = small_head.series.start
    assert start == SCAN_START
    for i, ds in enumerate(datasets):
        second = i // 3
        expected = start + timedelta(seconds=second)
        assert ds.AcquisitionDate == ds.ContentDate == expected.strftime("%Y%m%d")
        assert ds.AcquisitionTime == ds.ContentTime == expected.strftime("%H%M%S.%f")
        assert ds.TemporalPositionIdentifier == second + 1 and ds.NumberOfTemporalPositions == 9


def test_source_images_are_the_bracketing_acquired_instances(written, small_head):
    _, datasets = written
    uids = small_head.series.sop_instance_uids  # per volume, per slice
    for i, ds in enumerate(datasets):
        second, z = divmod(i, 3)
        expected = [uids[second // 4][z]] if second % 4 == 0 else [uids[second // 4][z], uids[second // 4 + 1][z]]
        assert [item.ReferencedSOPInstanceUID for item in ds.SourceImageSequence] == expected
        assert all(item.PurposeOfReferenceCodeSequence[0].CodeValue == "121322" for item in ds.SourceImageSequence)
        (series,) = ds.ReferencedSeriesSequence
        assert series.SeriesInstanceUID == small_head.series.series_uid
        assert [item.ReferencedSOPInstanceUID for item in series.ReferencedInstanceSequence] == expected


def test_equipment_and_derivation_name_the_node_and_the_model(written):
    _, datasets = written
    ds = datasets[4]  # second 1, slice 1
    assert ds.Manufacturer == "ctp-node" and ds.SoftwareVersions == __version__
    (equipment,) = ds.ContributingEquipmentSequence
    assert equipment.ManufacturerModelName == "bae2024-ctp-inpainting"
    assert list(equipment.SoftwareVersions) == ["1.0", "sha256:0123456789abcdef"]
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Equipment"
    text = ds.DerivationDescription
    assert "6 of 9 seconds" in text and "seconds 1-3, 5-7" in text and "dpmpp_2m, 20 steps" in text


def test_pixels_keep_the_source_rescale_and_round_trip(written, small_head):
    result, datasets = written
    source = pydicom.dcmread(small_head.files[0])  # Siemens-like: unsigned 12-bit, intercept -1024
    assert source.PixelRepresentation == 0 and source.BitsStored == 12
    ds = datasets[0]
    assert (ds.PixelRepresentation, ds.BitsAllocated, ds.BitsStored) == (1, 16, 16)
    assert (ds.RescaleIntercept, ds.RescaleSlope) == (source.RescaleIntercept, source.RescaleSlope)
    back = assemble_series(result.paths)
    np.testing.assert_array_equal(back.hu, np.rint(_hu_1s(small_head)))
    np.testing.assert_array_equal(back.times_s, SECONDS)
    np.testing.assert_array_equal(back.hu[4], small_head.series.hu[1])  # acquired: unchanged
    assert back.start == small_head.series.start
    assert back.origin == pytest.approx(small_head.series.origin) and back.spacing_mm == small_head.series.spacing_mm


def test_writing_twice_gives_identical_files(small_head, tmp_path):
    a = _write(small_head, tmp_path / "a")
    b = _write(small_head, tmp_path / "b")
    assert a.series_uid == b.series_uid
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a.paths, b.paths, strict=True))


@pytest.mark.parametrize("change", [{"generation": 2}, {"checkpoint_id": "sha256:fedcba"}, {"steps": 1500}])
def test_a_different_recipe_gives_new_uids(small_head, tmp_path, change):
    a = _write(small_head, tmp_path / "a")
    b = _write(small_head, tmp_path / "b", recipe=dataclasses.replace(RECIPE, **change))
    assert a.series_uid != b.series_uid
    uids_a = {pydicom.dcmread(p).SOPInstanceUID for p in a.paths}
    uids_b = {pydicom.dcmread(p).SOPInstanceUID for p in b.paths}
    assert not uids_a & uids_b


def test_out_of_range_hu_are_clipped_and_counted(small_head, tmp_path):
    hu = _hu_1s(small_head)
    hu[5, 0, 0, 0], hu[5, 0, 0, 1] = 40000.0, -40000.0
    result = _write(small_head, tmp_path, hu_1s=hu)
    assert result.clipped_voxels == 2
    pixels = pydicom.dcmread(result.paths[15]).pixel_array
    assert pixels[0, 0] == 32767 and pixels[0, 1] == -32768  # HU 31743 and -33792 with intercept -1024


def test_a_source_without_start_time_is_refused(small_head, tmp_path):
    source = dataclasses.replace(small_head.series, start=None)
    with pytest.raises(DerivedSeriesError, match="no start time"):
        _write(small_head, tmp_path / "out", source=source)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hu_1s": np.zeros((9, 3, 64, 63), np.float32)}, "expected"),
        ({"synthetic_mask": SYNTHETIC[:8]}, "synthetic_mask must be a bool array of length 9"),
        ({"grid_times_s": SECONDS * 1.5}, "exactly 1 s apart"),
        ({"grid_times_s": SECONDS[:8]}, "one per second"),
        ({"hu_1s": np.full((9, 3, 64, 64), np.nan, np.float32)}, "NaN"),
        ({"source_files": []}, "source_files is empty"),
    ],
)
def test_inconsistent_inputs_are_refused_before_writing(small_head, tmp_path, changes, message):
    with pytest.raises(DerivedSeriesError, match=message):
        _write(small_head, tmp_path / "out", **changes)
    assert not (tmp_path / "out").exists()


def test_a_header_from_another_series_is_refused(small_head, head16, tmp_path):
    with pytest.raises(DerivedSeriesError, match="InstanceUID .* pass a file of the source series"):
        _write(small_head, tmp_path / "out", source_files=head16.files)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"series_description": "CTP 1s RESEARCH ONLY"}, "SYNTHETIC"),
        ({"series_description": "SYNTHETIC " + "x" * 60}, "at most 64"),
        ({"steps": 0}, "steps"),
        ({"model_name": ""}, "model_name"),
    ],
)
def test_recipe_is_validated(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(RECIPE, **change)


def test_enhanced_ct_source_is_referenced_per_volume_instance(small_head, tmp_path):
    acquired = sample_study(small_head.study, parse_schedule("every:4"))
    files = write_study(acquired, tmp_path / "src", layout="enhanced")
    source = assemble_series(files)
    result = write_derived_series(
        _hu_1s(small_head), SECONDS, SYNTHETIC, source, files, tmp_path / "out", recipe=RECIPE
    )
    ds = pydicom.dcmread(result.paths[5])  # second 1, slice 2
    assert [i.ReferencedSOPInstanceUID for i in ds.SourceImageSequence] == [
        source.sop_instance_uids[0][0],
        source.sop_instance_uids[1][0],
    ]
    assert ds.SourceImageSequence[0].ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2.1"
    assert ds.RescaleIntercept == -1024
    assert dciodvfy_errors(result.paths[5]) == []


def test_pipeline_from_dicom_to_derived_dicom(head16, tmp_path):
    """assemble -> to_model_grid -> (a constant 'model') -> from_model_grid -> write -> assemble."""
    series = head16.series
    grid = to_model_grid(series)
    seconds = np.arange(13.0)
    synthetic = seconds % 4 != 0
    slabs = [np.full((13, 8, 192, 192), 0.25, np.float32) for _ in grid.slabs]  # 50 HU
    hu = from_model_grid(grid, slabs, synthetic, series, seconds)
    result = write_derived_series(hu, seconds, synthetic, series, head16.files, tmp_path, recipe=RECIPE)
    assert result.count == 13 * 16
    back = assemble_series(result.paths)
    np.testing.assert_array_equal(back.hu, np.rint(hu))
    np.testing.assert_array_equal(back.hu[[0, 4, 8, 12]], series.hu)
    assert np.count_nonzero(back.hu[6][grid.brain_mask] == 50) > 0.8 * grid.brain_mask.sum()


def test_unusable_volumes_are_not_referenced(small_head, tmp_path):
    usable = np.array([True, False, True])  # the volume at 4 s was motion-corrupted: second 4 is synthesised
    synthetic = SECONDS % 8 != 0
    result = _write(small_head, tmp_path, synthetic_mask=synthetic, usable=usable)
    uids = small_head.series.sop_instance_uids
    ds = pydicom.dcmread(result.paths[4 * 3 + 2])  # second 4, slice 2
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    assert [i.ReferencedSOPInstanceUID for i in ds.SourceImageSequence] == [uids[0][2], uids[2][2]]


def test_interpolated_seconds_are_marked_as_such(small_head, tmp_path):
    result = _write(small_head, tmp_path, synthetic_mask=np.zeros(9, dtype=bool))  # long-gap fallback everywhere
    ds = pydicom.dcmread(result.paths[3 * 3])  # second 3
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    assert ds.ImageComments.startswith("INTERPOLATED")
    assert "0 of 9 seconds synthesised" in ds.DerivationDescription
    assert "seconds 1-3, 5-7 linearly interpolated" in ds.DerivationDescription


def test_a_rerun_into_the_same_folder_replaces_the_files(small_head, tmp_path):
    first = _write(small_head, tmp_path)
    second = _write(small_head, tmp_path)
    assert first.paths == second.paths
    assert len(list(tmp_path.iterdir())) == 27
