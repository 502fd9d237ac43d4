"""write_derived_series: the 1 s series as marked, valid, deterministic derived DICOM."""

from __future__ import annotations

import dataclasses
import os
import stat
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ctp_node import __version__
from ctp_node.phantom import PhantomConfig, generate_phantom
from ctp_node.phantom.dicom_study import write_study
from ctp_node.phantom.sampling import SCAN_START, parse_schedule, sample_study
from ctp_node.series.assemble import assemble_series
from ctp_node.series.derived import (
    PATIENT_STUDY_KEYWORDS,
    DerivedRecipe,
    DerivedSeriesError,
    write_derived_series,
)
from ctp_node.series.grid import FillCounts, from_model_grid, to_model_grid
from model.planner import plan_seconds
from tests.dciodvfy import dciodvfy_errors
from tests.series.fill_helpers import fill_for

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


def _write(case, out: Path, recipe: DerivedRecipe = RECIPE, synthetic=SYNTHETIC, usable=None, **changes):
    args = {
        "hu_1s": _hu_1s(case),
        "fill": fill_for(case.series.times_s, synthetic, usable),
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
        ({"fill": fill_for(np.array([0.0, 8.0]))}, "the plan was made for 2 volumes"),
        ({"hu_1s": np.zeros((8, 3, 64, 64), np.float32)}, "one image per second"),
        ({"hu_1s": np.full((9, 3, 64, 64), np.nan, np.float32)}, "NaN"),
        ({"source_files": [], "header": None}, "source_files is empty"),
    ],
)
def test_inconsistent_inputs_are_refused_before_writing(small_head, tmp_path, changes, message):
    changes = dict(changes)
    if "header" in changes:  # a series without its header template: the header comes from the files
        changes["source"] = dataclasses.replace(small_head.series, header=changes.pop("header"))
    with pytest.raises(DerivedSeriesError, match=message):
        _write(small_head, tmp_path / "out", **changes)
    assert not (tmp_path / "out").exists()


def test_a_header_from_another_series_is_refused(small_head, head16, tmp_path):
    without_template = dataclasses.replace(small_head.series, header=None)
    with pytest.raises(DerivedSeriesError, match="InstanceUID .* pass a file of the source series"):
        _write(small_head, tmp_path / "out", source=without_template, source_files=head16.files)
    other_template = dataclasses.replace(small_head.series, header=head16.series.header)
    with pytest.raises(DerivedSeriesError, match="InstanceUID"):
        _write(small_head, tmp_path / "out", source=other_template)


def test_the_header_template_is_used_without_reading_the_files_again(small_head, tmp_path):
    assert small_head.series.header is not None  # read once by the assembler
    result = _write(small_head, tmp_path / "out", source_files=[tmp_path / "gone.dcm"])  # never opened
    assert pydicom.dcmread(result.paths[0]).PatientID == small_head.series.header.PatientID


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
        _hu_1s(small_head), fill_for(source.times_s, SYNTHETIC), source, files, tmp_path / "out", recipe=RECIPE
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
    """assemble -> to_model_grid -> (a 'model' that adds 3 HU to interpolation) -> from_model_grid -> write
    -> assemble."""
    series = head16.series  # acquired at 0, 4, 8, 12 s
    grid = to_model_grid(series)
    seconds = np.arange(13.0)
    synthetic = seconds % 4 != 0
    slabs = []
    for volumes in grid.slabs:  # the engine's sequence: acquired seconds hold the model's copies
        sequence = np.empty((13, 8, 192, 192), np.float32)
        for g in range(13):
            left, w = min(g // 4, 2), (g - 4 * min(g // 4, 2)) / 4
            lerp = volumes[left] + np.float32(w) * (volumes[left + 1] - volumes[left])
            sequence[g] = lerp if g % 4 == 0 else np.clip(lerp + np.float32(3 / 40), -1, 1)
        slabs.append(sequence)
    plan = fill_for(series.times_s, synthetic)
    hu = from_model_grid(grid, slabs, plan, series).hu
    result = write_derived_series(hu, plan, series, head16.files, tmp_path, recipe=RECIPE)
    assert result.count == 13 * 16
    back = assemble_series(result.paths)
    np.testing.assert_array_equal(back.hu, np.rint(hu))
    np.testing.assert_array_equal(back.hu[[0, 4, 8, 12]], series.hu)
    interpolated = (series.hu[1] + series.hu[2]) / 2  # second 6
    corrected = np.abs(back.hu[6] - (interpolated + 3)) <= 1.0  # the model's +3 HU, rounded to whole HU
    assert np.count_nonzero(corrected & grid.brain_mask) > 0.7 * grid.brain_mask.sum()


def test_unusable_volumes_are_not_referenced(small_head, tmp_path):
    usable = np.array([True, False, True])  # the volume at 4 s was motion-corrupted: second 4 is synthesised
    synthetic = SECONDS % 8 != 0
    result = _write(small_head, tmp_path, synthetic=synthetic, usable=usable)
    uids = small_head.series.sop_instance_uids
    ds = pydicom.dcmread(result.paths[4 * 3 + 2])  # second 4, slice 2
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    assert [i.ReferencedSOPInstanceUID for i in ds.SourceImageSequence] == [uids[0][2], uids[2][2]]


def test_interpolated_seconds_are_marked_as_such(small_head, tmp_path):
    result = _write(small_head, tmp_path, synthetic=np.zeros(9, dtype=bool))  # long-gap fallback everywhere
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


def _through_the_grid(files: list[Path], out: Path):
    """Assemble ``files``, fill every second with a constant model output (0.25) through the model grid
    and back, and write the derived series: (series, back, the written paths)."""
    series = assemble_series(files)
    plan = plan_seconds(series.times_s, long_gap="linear")
    grid = to_model_grid(series)
    slabs = [np.full((plan.seconds.size, 8, 192, 192), 0.25, np.float32) for _ in grid.slabs]
    back = from_model_grid(grid, slabs, plan, series)
    result = write_derived_series(back.hu, back.fill, series, files, out, recipe=RECIPE)
    return series, back, result.paths


@pytest.fixture(scope="module")
def irregular(tmp_path_factory):
    """64 x 64 x 3, 22 s acquired every 1.5 s for 9 s, then every 3 s (the planner snaps half of them)."""
    folder = tmp_path_factory.mktemp("irregular")
    study = generate_phantom(PhantomConfig(matrix=64, slices=3, duration_s=22, noise_hu=5.0, seed=4))
    acquired = sample_study(study, parse_schedule("irregular:1.5@9,3"))
    files = write_study(acquired, folder / "src", uid_seed="pipeline-tests-irregular")
    series, back, paths = _through_the_grid(files, folder / "out")
    return files, series, back, [pydicom.dcmread(p) for p in paths]


def _seconds_after(start, ds) -> float:
    moment = datetime.strptime(ds.AcquisitionDate + ds.AcquisitionTime, "%Y%m%d%H%M%S.%f")
    return (moment - start).total_seconds()


def test_irregular_sampling_keeps_true_acquisition_times(irregular):
    files, series, back, datasets = irregular
    source_times = {}
    for path in files:  # what the scanner wrote, per acquired instance
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        source_times[ds.SOPInstanceUID] = ds.AcquisitionTime
    assert sum(1 for t in series.times_s if abs(t - round(t)) > 0.1) >= 3  # the case has off-second volumes
    n_z = series.hu.shape[1]
    times = []
    for i, ds in enumerate(datasets):
        g = i // n_z
        assert ds.AcquisitionTime == ds.ContentTime and ds.AcquisitionDate == ds.ContentDate
        shown = _seconds_after(series.start, ds)
        assert shown == pytest.approx(back.fill.fills[g].time_s, abs=1e-6)
        if ds.ImageComments.startswith("ACQUIRED"):
            (reference,) = ds.SourceImageSequence
            assert ds.AcquisitionTime == source_times[reference.ReferencedSOPInstanceUID]  # its own, not snapped
        if i % n_z == 0:
            times.append(shown)
    assert np.all(np.diff(times) > 0)  # strictly increasing, no duplicates
    acquired = sorted(_seconds_after(series.start, ds) for ds in datasets[::n_z] if "PRIMARY" in ds.ImageType)
    np.testing.assert_allclose(acquired, series.times_s, atol=1e-6)  # every volume, at its own time


def test_irregular_synthetic_images_show_their_stated_time(irregular):
    _, series, back, datasets = irregular
    n_z = series.hu.shape[1]
    outside = series.hu[0] < -500  # air and the like: linear in time, so exactly the state at the image's time
    for ds in datasets[::n_z]:
        if not ds.ImageComments.startswith("SYNTHETIC"):
            continue
        t = _seconds_after(series.start, ds)
        right = int(np.searchsorted(series.times_s, t))
        w = (t - series.times_s[right - 1]) / (series.times_s[right] - series.times_s[right - 1])
        expected = (1 - w) * series.hu[right - 1] + w * series.hu[right]
        g = ds.TemporalPositionIdentifier - 1
        np.testing.assert_allclose(back.hu[g][outside], expected[outside], atol=1e-3)
        assert f"SYNTHETIC image at {t:.3f}".rstrip("0").rstrip(".") in ds.ImageComments
        fill = back.fill.fills[g].voxels
        assert f"model: {fill.model} voxels, vessel fit: {fill.vessel_fit} voxels, linear: {fill.linear}" in (
            ds.ImageComments
        )


def test_fill_counts_must_match_the_seconds(small_head):
    with pytest.raises(ValueError, match="give one per second"):
        fill_for(small_head.series.times_s).with_voxels([FillCounts(model=1)])


def _padded_source(case, folder: Path, *, drop: tuple[str, ...] = ()) -> list[Path]:
    """The case's acquired volumes as GE-like signed files whose corners outside a circle are padding
    (-2000 stored, -3024 HU), without the attributes in ``drop``."""
    acquired = sample_study(case.study, parse_schedule("every:4"))
    files = write_study(acquired, folder, uid_seed="padding-test")
    for path in files:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array.copy()
        y, x = np.mgrid[: pixels.shape[0], : pixels.shape[1]]
        pixels[np.hypot(y - 31.5, x - 31.5) > 30] = -2000
        ds.PixelData = pixels.tobytes()
        ds.add_new("PixelPaddingValue", "SS", -2000)
        for keyword in drop:
            if keyword in ds:
                del ds[keyword]
        ds.save_as(path, enforce_file_format=True)
    return files


TYPE2 = ("AccessionNumber", "PatientBirthDate", "PatientSex", "ReferringPhysicianName", "StudyID")


def test_padding_is_carried_over_and_stays_padding_in_synthetic_seconds(small_head, tmp_path):
    files = _padded_source(small_head, tmp_path / "src")
    source = assemble_series(files)
    outside = np.hypot(*np.mgrid[:64, :64] - 31.5) > 30
    assert np.all(source.hu[:, :, outside] == -3024)
    hu = _hu_1s(small_head)
    hu[[0, 4, 8]] = source.hu
    hu[2][:, outside] = -1500.0  # a synthetic second whose padding was disturbed (e.g. by blending)
    result = write_derived_series(
        hu, fill_for(source.times_s, SYNTHETIC), source, files, tmp_path / "out", recipe=RECIPE
    )
    for path in result.paths:
        ds = pydicom.dcmread(path)
        assert ds.PixelPaddingValue == -2000 and ds["PixelPaddingValue"].VR == "SS"
        assert np.all(ds.pixel_array[outside] == -2000), path.name
        assert np.all(ds.pixel_array[~outside] != -2000)
    assert dciodvfy_errors(result.paths[2 * 3]) == []


def test_type2_attributes_missing_in_the_source_are_written_empty(small_head, tmp_path):
    files = _padded_source(small_head, tmp_path / "src", drop=TYPE2)
    assert not any(k in pydicom.dcmread(files[0]) for k in TYPE2)
    source = assemble_series(files)
    hu = _hu_1s(small_head)
    hu[[0, 4, 8]] = source.hu
    result = write_derived_series(
        hu, fill_for(source.times_s, SYNTHETIC), source, files, tmp_path / "out", recipe=RECIPE
    )
    ds = pydicom.dcmread(result.paths[5])
    for keyword in TYPE2:
        assert keyword in ds and ds[keyword].value in ("", None), keyword
    assert "Laterality" not in ds  # a head is not a paired structure
    for path in (result.paths[0], result.paths[5]):
        assert dciodvfy_errors(path) == [], path.name


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_results_are_private_whatever_the_umask(small_head, tmp_path, umask):
    previous = os.umask(umask)
    try:
        result = _write(small_head, tmp_path / "results" / "1.2.3" / "g1")
    finally:
        os.umask(previous)
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in result.paths} == {"0o640"}
    folders = [tmp_path / "results", tmp_path / "results" / "1.2.3", tmp_path / "results" / "1.2.3" / "g1"]
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in folders} == {"0o750"}


@pytest.mark.parametrize(
    ("value", "limit", "expected"),
    [(None, None, None), (-2000, None, (-2000, -2000, -2000)), (-2000, -1100, (-2000, -1100, -2000)),
     (0, -1000, (-1000, 0, 0)), (65535, None, (32767, 32767, 32767))],
)  # fmt: skip
def test_padding_range_in_stored_values(value, limit, expected):
    from ctp_node.series.derived import _padding

    header = pydicom.Dataset()
    if value is not None:
        header.add_new("PixelPaddingValue", "US" if value > 32767 else "SS", value)
    if limit is not None:
        header.add_new("PixelPaddingRangeLimit", "SS", limit)
    assert _padding(header) == expected


@pytest.fixture(scope="module")
def staggered(tmp_path_factory):
    """Siemens-like, acquired every 1.5 s for 12 s, 8 slices, each slice of a volume 0.04 s after the
    previous one (as a scanner that writes per-slice AcquisitionTime does)."""
    folder = tmp_path_factory.mktemp("staggered")
    study = generate_phantom(PhantomConfig(matrix=64, slices=8, duration_s=13, noise_hu=5.0, seed=4))
    acquired = sample_study(study, parse_schedule("every:1.5"))
    files = write_study(acquired, folder / "src", vendor="siemens", uid_seed="pipeline-tests-staggered")
    own = {}
    for path in files:
        ds = pydicom.dcmread(path)
        z = int(path.stem.split("_")[2])
        moment = datetime.strptime(ds.AcquisitionDate + ds.AcquisitionTime, "%Y%m%d%H%M%S.%f")
        moment += timedelta(seconds=0.04 * z)
        ds.AcquisitionDate, ds.AcquisitionTime = moment.strftime("%Y%m%d"), moment.strftime("%H%M%S.%f")
        ds.save_as(path)
        own[ds.SOPInstanceUID] = (ds.AcquisitionDate, ds.AcquisitionTime)
    series, _, paths = _through_the_grid(files, folder / "out")
    return own, series, [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


def test_acquired_images_keep_their_own_per_slice_acquisition_time(staggered):
    """Issue 23 item 11: 7 of every 8 acquired images carried their volume's time (up to 0.28 s off)."""
    own, series, datasets = staggered
    acquired = [ds for ds in datasets if ds.ImageComments.startswith("ACQUIRED")]
    assert len(acquired) == series.hu.shape[0] * 8
    for ds in acquired:
        (reference,) = ds.SourceImageSequence
        date, time = own[reference.ReferencedSOPInstanceUID]
        assert (ds.AcquisitionDate, ds.AcquisitionTime) == (date, time), ds.InstanceNumber
        assert (ds.ContentDate, ds.ContentTime) == (date, time)


def test_staggered_slices_keep_increasing_times_at_every_position(staggered):
    _, series, datasets = staggered
    n_z = series.hu.shape[1]
    for z in range(n_z):
        times = [_seconds_after(series.start, ds) for ds in datasets[z::n_z]]
        assert np.all(np.diff(times) > 0), z
