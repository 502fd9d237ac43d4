"""The perfusion outputs (ctp_node/series/outputs/): valid DICOM (dciodvfy), read back by pydicom/highdicom,
values and masks round-trip, research-use marking, switches, failure paths."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from ctp_node.config import PerfusionOutputSettings
from ctp_node.errors import PerfusionOutputError
from ctp_node.phantom import PhantomConfig, generate_phantom
from ctp_node.phantom.dicom_study import write_study
from ctp_node.phantom.sampling import parse_schedule, sample_study
from ctp_node.series.node_dicom import CAUTION
from ctp_node.series.outputs import (
    AnalysisKind,
    output_input,
    write_perfusion_outputs,
)
from ctp_node.series.outputs.colour import colour_layout
from ctp_node.series.outputs.quantitative import PADDING
from ctp_node.series.outputs.styles import MAP_STYLES
from tests.dciodvfy import dciodvfy_errors
from tests.series.outputs_cases import SHAPE, SOURCE_UID, disc, make_analysis, make_input, write_reference_files


@pytest.fixture(scope="module")
def reference_files(tmp_path_factory) -> list[Path]:
    return write_reference_files(tmp_path_factory.mktemp("reference"))


def by_kind(written, kind: str, analysis: str = "synthetic", name: str | None = None):
    found = [s for s in written if s.kind == kind and s.analysis == analysis and (name is None or s.name == name)]
    assert found, f"no {kind} {analysis} {name} among {[(s.kind, s.analysis, s.name) for s in written]}"
    return found[0]


@pytest.fixture(scope="module")
def written(reference_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs")
    return out, write_perfusion_outputs(make_input(reference_files), out / "perfusion", png_dir=out)


def test_every_output_is_its_own_research_marked_series(written, reference_files):
    out, series = written
    kinds = sorted((s.kind, s.analysis, s.name) for s in series)
    expected = [("qa_report", "both", "qa")]
    for analysis in ("acquired", "synthetic"):
        expected += [(k, analysis, n) for k in ("map", "colour_map") for n in MAP_STYLES]
        expected += [("seg", analysis, "lesions"), ("sr", analysis, "volumes")]
    assert kinds == sorted(expected)
    assert len({s.series_uid for s in series}) == len(series)
    assert len({s.series_number for s in series}) == len(series)
    assert len({s.folder for s in series}) == len(series)
    reference = pydicom.dcmread(reference_files[0], stop_before_pixels=True)
    for s in series:
        for path in s.paths:
            assert path.parent == s.folder and stat.S_IMODE(path.stat().st_mode) == 0o640
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            assert ds.SeriesInstanceUID == s.series_uid
            assert ds.SeriesDescription.startswith("RUO ") and "RESEARCH USE ONLY" in ds.SeriesDescription
            assert ds.StudyInstanceUID == reference.StudyInstanceUID and ds.PatientID == reference.PatientID
            assert ds.Manufacturer == "ctp-node"
    assert (out / "qa_report.png").stat().st_size > 10_000


@pytest.mark.parametrize("kind", ["map", "colour_map", "sr", "seg", "qa_report"])
def test_dciodvfy_finds_no_error(written, kind):
    _, series = written
    for s in [s for s in series if s.kind == kind]:
        for path in s.paths[:2]:
            assert dciodvfy_errors(path) == [], f"{kind} {s.analysis} {s.name}: {path}"


@pytest.mark.parametrize("name", list(MAP_STYLES))
def test_quantitative_map_values_round_trip(written, reference_files, name):
    _, series = written
    s = by_kind(series, "map", "synthetic", name)
    style = MAP_STYLES[name]
    expected = make_analysis().map(name)
    for z, path in enumerate(s.paths):
        ds = pydicom.dcmread(path)
        source = pydicom.dcmread(reference_files[z], stop_before_pixels=True)
        values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_allclose(values, expected[z], atol=style.slope / 2 + 1e-6)
        assert ds.Modality == "CT" and list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert ds.ImagePositionPatient == source.ImagePositionPatient
        assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        unit = ds.RealWorldValueMappingSequence[0].MeasurementUnitsCodeSequence[0]
        assert unit.CodeValue == style.ucum.value and unit.CodingSchemeDesignator == "UCUM"
        assert CAUTION in ds.ImageComments and style.unit in ds.ImageComments


def test_acquired_maps_do_not_claim_the_reference_images_as_source(written):
    _, series = written
    ds = pydicom.dcmread(by_kind(series, "map", "acquired", "cbf").paths[0], stop_before_pixels=True)
    assert "SourceImageSequence" not in ds and "acquired" in ds.ImageComments


def test_colour_maps_are_rgb_with_a_scale_bar_and_burned_in_caution(written):
    _, series = written
    analysis = make_analysis()
    ds = pydicom.dcmread(by_kind(series, "colour_map", "synthetic", "tmax").paths[1])
    assert ds.PhotometricInterpretation == "RGB" and ds.BurnedInAnnotation == "YES"
    rgb = ds.pixel_array
    layout = colour_layout(*SHAPE[1:])
    assert rgb.shape == (*layout.shape, 3)
    height, width = layout.map_shape
    image = rgb[layout.band_px :, :width]
    # On the display grid: the brain's outline is smoothed, so look one map pixel inside and outside it;
    # the orientation markers' boxes lie at the edges, over the background.
    brain = np.kron(analysis.brain_mask[1], np.ones((layout.zoom, layout.zoom), dtype=bool))
    markers = np.zeros_like(brain)
    for left, top, right, bottom in layout.marker_boxes().values():
        markers[top - layout.band_px : bottom - layout.band_px, left:right] = True
    outside = ~ndimage.binary_dilation(brain, iterations=layout.zoom) & ~markers
    inside = ndimage.binary_erosion(brain, iterations=layout.zoom) & ~markers
    assert not image[outside].any()  # black outside the brain
    assert (image[inside].sum(axis=-1) > 0).all()
    assert rgb[: layout.band_px].any() and rgb[layout.band_px :, width:].any()  # the band's text, the bar
    assert CAUTION in ds.ImageComments


def test_sr_volumes_round_trip_with_codes_and_units(written):
    _, series = written
    sr = hd.sr.srread(by_kind(series, "sr", "synthetic").paths[0])
    analysis = make_analysis()
    assert not sr.content.get_planar_roi_measurement_groups() and not sr.content.get_volumetric_roi_measurement_groups()
    found = {}
    for group in _measurement_groups(sr):
        for measurement in group.get_measurements():
            found[group.tracking_identifier] = (measurement.name, measurement.value, measurement.unit)
    expected = {
        "Core rCBF<30%": analysis.core_volume_ml, "Tmax>6s": analysis.tmax6_volume_ml,
        "Tmax>10s": analysis.tmax10_volume_ml, "Mismatch": analysis.mismatch_volume_ml,
        "Mismatch ratio": analysis.mismatch_ratio, "Hypoperfusion intensity ratio":
        analysis.hypoperfusion_intensity_ratio,
    }  # fmt: skip
    assert set(found) == set(expected)
    for key, value in expected.items():
        name, got, unit = found[key]
        assert got == pytest.approx(value, abs=1e-3)
        if "ratio" in key.lower():
            assert (name.value, unit.value, unit.scheme_designator) == ("118586006", "{ratio}", "UCUM")
        else:
            assert (name.value, name.scheme_designator, unit.value) == ("118565006", "SCT", "ml")


def _measurement_groups(sr):
    """The TID 1501 groups of a read-back TID 1500 report."""
    groups = sr.content.get_image_measurement_groups()
    assert groups, "no measurement groups"
    return groups


def test_seg_masks_round_trip_and_reference_the_images(written, reference_files):
    _, series = written
    seg = hd.seg.segread(by_kind(series, "seg", "synthetic").paths[0])
    analysis = make_analysis()
    uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in reference_files]
    labels = {n: seg.get_segment_description(n).segment_label for n in seg.segment_numbers}
    assert labels == {1: "Core rCBF<30%", 2: "Tmax>6s", 3: "Tmax>10s"}
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2, 3])
    assert pixels.shape == (*SHAPE, 3)
    for index, name in enumerate(("core", "tmax6", "tmax10")):
        np.testing.assert_array_equal(pixels[..., index].astype(bool), analysis.mask(name))


def test_qa_report_png_and_secondary_capture(written):
    out, series = written
    ds = pydicom.dcmread(by_kind(series, "qa_report", "both").paths[0])
    assert ds.pixel_array.ndim == 3 and ds.pixel_array.shape[-1] == 3
    assert "Guardrail: pass" in ds.ImageComments and CAUTION in ds.ImageComments


def test_nan_in_a_map_is_padding_and_said(reference_files, tmp_path):
    cbf = make_analysis().cbf.copy()
    cbf[1, 20:24, 20:24] = np.nan
    data = make_input(reference_files, synthetic=make_analysis(cbf=cbf), acquired=None)
    written = write_perfusion_outputs(data, tmp_path, PerfusionOutputSettings(qa_report=False))
    s = by_kind(written, "map", "synthetic", "cbf")
    ds = pydicom.dcmread(s.paths[1])
    assert (ds.pixel_array[20:24, 20:24] == PADDING).all() and ds.PixelPaddingValue == PADDING
    assert (ds.pixel_array[~np.isnan(cbf[1])] != PADDING).all()
    assert "16 voxels without a value" in s.notes[0] and "16 voxels without a value" in ds.ImageComments
    colour = pydicom.dcmread(by_kind(written, "colour_map", "synthetic", "cbf").paths[1]).pixel_array
    layout = colour_layout(*SHAPE[1:])
    zoom, top = layout.zoom, layout.band_px
    assert not colour[top + 20 * zoom : top + 24 * zoom, 20 * zoom : 24 * zoom].any()  # black on the display grid
    assert dciodvfy_errors(s.paths[1]) == []


def test_empty_masks_still_give_a_seg_and_an_sr_without_undefined_ratios(reference_files, tmp_path):
    empty = np.zeros(SHAPE, dtype=bool)
    analysis = make_analysis(
        core_mask=empty, tmax6_mask=empty, tmax10_mask=empty, core_volume_ml=0.0, tmax6_volume_ml=0.0,
        tmax10_volume_ml=0.0, mismatch_volume_ml=0.0, mismatch_ratio=None, hypoperfusion_intensity_ratio=None,
    )  # fmt: skip
    data = make_input(reference_files, synthetic=analysis, acquired=None)
    settings = PerfusionOutputSettings(quantitative_maps=False, colour_maps=False)
    written = write_perfusion_outputs(data, tmp_path, settings)
    seg_series = by_kind(written, "seg", "synthetic")
    assert "empty segments: Core rCBF<30%, Tmax>6s, Tmax>10s" in seg_series.notes
    seg = hd.seg.segread(seg_series.paths[0])
    uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in reference_files]
    assert not seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2, 3]).any()
    assert dciodvfy_errors(seg_series.paths[0]) == []
    sr_series = by_kind(written, "sr", "synthetic")
    assert "Mismatch ratio" in sr_series.notes[0] and "Hypoperfusion intensity ratio" in sr_series.notes[0]
    found = {g.tracking_identifier: g.get_measurements()[0].value for g in _measurement_groups(
        hd.sr.srread(sr_series.paths[0]))}  # fmt: skip
    assert found == {"Core rCBF<30%": 0.0, "Tmax>6s": 0.0, "Tmax>10s": 0.0, "Mismatch": 0.0}
    assert dciodvfy_errors(sr_series.paths[0]) == []


def test_missing_aif_and_vof_still_give_a_report(reference_files, tmp_path):
    analysis = make_analysis(aif_curve=None, aif_voxels=None, vof_curve=None, vof_voxels=None)
    data = make_input(reference_files, synthetic=analysis, acquired=None, synthetic_curves=None, guardrail=None)
    only_report = PerfusionOutputSettings(
        quantitative_maps=False, colour_maps=False, structured_report=False, segmentation=False
    )
    written = write_perfusion_outputs(data, tmp_path, only_report)
    assert [s.kind for s in written] == ["qa_report"]
    ds = pydicom.dcmread(written[0].paths[0])
    assert "Guardrail: not run" in ds.ImageComments
    assert dciodvfy_errors(written[0].paths[0]) == []


def test_switches(reference_files, tmp_path):
    data = make_input(reference_files)
    assert write_perfusion_outputs(data, tmp_path / "off", PerfusionOutputSettings(enabled=False)) == []
    assert not (tmp_path / "off").exists()
    settings = PerfusionOutputSettings(colour_maps=False, qa_report=False, from_acquired=False)
    written = write_perfusion_outputs(data, tmp_path / "some", settings)
    assert {(s.kind, s.analysis) for s in written} == {("map", "synthetic"), ("sr", "synthetic"), ("seg", "synthetic")}


def test_a_rerun_replaces_the_same_series(reference_files, tmp_path):
    data = make_input(reference_files, acquired=None)
    settings = PerfusionOutputSettings(colour_maps=False, qa_report=False)
    first = write_perfusion_outputs(data, tmp_path, settings)
    again = write_perfusion_outputs(data, tmp_path, settings)
    assert [(s.series_uid, s.paths) for s in first] == [(s.series_uid, s.paths) for s in again]
    newer = write_perfusion_outputs(dataclasses.replace(data, generation=2), tmp_path / "g2", settings)
    assert not {s.series_uid for s in newer} & {s.series_uid for s in first}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: dataclasses.replace(d, reference_files=d.reference_files[:2]), "2 reference images for maps of 3"),
        (lambda d: dataclasses.replace(d, synthetic=make_analysis(core_mask=np.zeros(SHAPE))), "core_mask must be"),
        (lambda d: dataclasses.replace(d, synthetic=make_analysis(cbv=np.zeros((3, 4, 4)))), "cbv has shape"),
        (lambda d: dataclasses.replace(d, source_series_uid=""), "source_series_uid is empty"),
        (lambda d: dataclasses.replace(d, reference_files=d.reference_files[::-1]), "increasing slice order"),
        (
            lambda d: dataclasses.replace(d, acquired=make_analysis(AnalysisKind.ACQUIRED, aif_curve=np.zeros(3))),
            "aif_curve",
        ),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(reference_files, tmp_path, change, message):
    with pytest.raises(PerfusionOutputError, match=message):
        write_perfusion_outputs(change(make_input(reference_files)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_from_compute_perfusion(tmp_path):
    """The adapter: maps of a small noisy phantom through ``output_input``; the SR states its volumes."""
    from ctp_node.perfusion import compute_perfusion

    study = generate_phantom(PhantomConfig(matrix=64, slices=3, duration_s=40, noise_hu=3.0, seed=8))
    synthetic = sample_study(study, parse_schedule("every:1"))
    acquired = sample_study(study, parse_schedule("every:4"))
    first = dataclasses.replace(synthetic, hu=synthetic.hu[:1], times_s=synthetic.times_s[:1])
    references = write_study(first, tmp_path / "reference", uid_seed="outputs-adapter")
    voxel_ml = float(np.prod(study.spacing_mm)) / 1000.0
    maps = compute_perfusion(synthetic.hu, synthetic.times_s, voxel_ml)
    maps_acquired = compute_perfusion(acquired.hu, acquired.times_s, voxel_ml)
    data = output_input(
        maps, synthetic.hu, references, SOURCE_UID, voxel_volume_ml=voxel_ml, acquired_maps=maps_acquired,
        acquired_hu=acquired.hu,
    )  # fmt: skip
    assert data.synthetic.core_volume_ml == pytest.approx(maps.core_volume_ml)
    assert data.synthetic.tmax6_volume_ml == pytest.approx(maps.hypoperfusion_volume_ml)
    assert set(data.synthetic_curves.curves) <= {"normal (Tmax <= 6 s)", "Tmax > 6 s, not core", "core (rCBF < 30 %)"}
    assert data.acquired_curves.times_s.size == acquired.times_s.size
    written = write_perfusion_outputs(data, tmp_path / "out", PerfusionOutputSettings(colour_maps=False))
    groups = _measurement_groups(hd.sr.srread(by_kind(written, "sr", "synthetic").paths[0]))
    volumes = {g.tracking_identifier: g.get_measurements()[0].value for g in groups}
    assert volumes["Core rCBF<30%"] == pytest.approx(maps.core_volume_ml, abs=1e-3)
    assert volumes["Tmax>6s"] == pytest.approx(maps.hypoperfusion_volume_ml, abs=1e-3)
    cbf = pydicom.dcmread(by_kind(written, "map", "synthetic", "cbf").paths[1])
    np.testing.assert_allclose(cbf.pixel_array * float(cbf.RescaleSlope), maps.cbf[1], atol=0.05 + 1e-6)


def test_a_series_with_interpolated_seconds_gets_curves_and_a_report_on_its_own_clock(tmp_path):
    """The analysis drops seconds that are linear interpolations (a guardrail fallback, a long gap): its
    times are then fewer than the series' frames. The QA report's curves once failed on that ("x and y
    must have same first dimension")."""
    from ctp_node.perfusion import compute_perfusion

    study = generate_phantom(PhantomConfig(matrix=64, slices=2, duration_s=41, noise_hu=3.0, seed=8))
    series = sample_study(study, parse_schedule("every:1"))
    hu = series.hu.copy()
    for t in range(13, 16):  # seconds 13-15 filled by interpolation between 12 and 16
        w = np.float32((t - 12) / 4)
        hu[t] = hu[12] + w * (hu[16] - hu[12])
    first = dataclasses.replace(series, hu=series.hu[:1], times_s=series.times_s[:1])
    references = write_study(first, tmp_path / "reference", uid_seed="outputs-interpolated")
    voxel_ml = float(np.prod(study.spacing_mm)) / 1000.0
    maps = compute_perfusion(hu, series.times_s, voxel_ml)
    assert maps.times_s.size < hu.shape[0]  # the interpolated seconds were left out of the analysis
    data = output_input(
        maps, hu, references, SOURCE_UID, voxel_volume_ml=voxel_ml, synthetic_times_s=series.times_s
    )  # fmt: skip
    assert data.synthetic_curves.times_s.size == hu.shape[0]
    only_report = PerfusionOutputSettings(
        quantitative_maps=False, colour_maps=False, structured_report=False, segmentation=False
    )
    written = write_perfusion_outputs(data, tmp_path / "out", only_report)
    assert [s.kind for s in written] == ["qa_report"]
    # The dropped seconds are a 4 s gap during the bolus: the analysis withholds every volume.
    assert set(maps.withheld) == {"core", "tmax6", "tmax10"} and maps.acquired_interval_s == pytest.approx(4.0)


def test_mean_tissue_curves_average_each_region_per_frame():
    from ctp_node.series.outputs import mean_tissue_curves

    rng = np.random.default_rng(3)
    hu = rng.normal(30, 5, (6, *SHAPE)).astype(np.float32)
    core, tmax6 = disc(4, 1), disc(9, 1)
    curves = mean_tissue_curves(hu, np.arange(6.0), {"core": core, "penumbra": tmax6 & ~core, "none": disc(0, 0)})
    assert list(curves.curves) == ["core", "penumbra"]  # an empty region has no curve
    np.testing.assert_allclose(curves.curves["core"], [frame[core].mean() for frame in hu], rtol=1e-6)
    np.testing.assert_allclose(curves.curves["penumbra"], [frame[tmax6 & ~core].mean() for frame in hu], rtol=1e-6)


def test_adapter_reads_vof_and_tmax10_of_the_analysis():
    from types import SimpleNamespace

    from ctp_node.series.outputs import analysis_from_maps

    known = make_analysis()
    times = known.times_s
    vof = SimpleNamespace(curve=known.vof_curve, voxels=known.vof_voxels)
    maps = SimpleNamespace(
        cbf=known.cbf, cbv=known.cbv, mtt=known.mtt, tmax=known.tmax, brain_mask=known.brain_mask,
        tissue_mask=known.brain_mask, core_mask=known.core_mask, hypoperfusion_mask=known.tmax6_mask,
        severe_mask=known.tmax10_mask, times_s=times, aif_curve=known.aif_curve, aif_voxels=known.aif_voxels,
        aif_selection=SimpleNamespace(vof=vof), voxel_volume_ml=0.125, core_volume_ml=None,
        hypoperfusion_volume_ml=None, severe_hypoperfusion_volume_ml=None, mismatch_volume_ml=None,
        reference_cbf=40.0, method="parametric", notes=["a note"],
    )  # fmt: skip
    analysis = analysis_from_maps(maps, AnalysisKind.SYNTHETIC)
    np.testing.assert_array_equal(analysis.tmax10_mask, known.tmax10_mask)
    np.testing.assert_array_equal(analysis.vof_voxels, known.vof_voxels)
    assert analysis.tmax10_volume_ml == pytest.approx(known.tmax10_volume_ml)
    assert analysis.mismatch_volume_ml == pytest.approx(known.tmax6_volume_ml - known.core_volume_ml)
    assert analysis.hypoperfusion_intensity_ratio == pytest.approx(known.hypoperfusion_intensity_ratio)
    no_vof = SimpleNamespace(**{**vars(maps), "aif_selection": SimpleNamespace(vof=None)})
    assert analysis_from_maps(no_vof, AnalysisKind.ACQUIRED).vof_curve is None
    other_times = SimpleNamespace(**{**vars(maps), "aif_selection": SimpleNamespace(vof=SimpleNamespace(
        curve=known.vof_curve[:5], voxels=known.vof_voxels))})  # fmt: skip
    assert analysis_from_maps(other_times, AnalysisKind.ACQUIRED).vof_voxels is None


def test_withheld_volumes_are_left_out_of_sr_and_seg_with_the_reason(reference_files, tmp_path):
    reason = "12 mL of core (rCBF < 30 %) in the less affected hemisphere (limit 5 mL)"
    analysis = make_analysis(
        core_volume_ml=None, mismatch_volume_ml=None, mismatch_ratio=None, withheld={"core": reason}
    )
    data = make_input(reference_files, synthetic=analysis, acquired=None)
    settings = PerfusionOutputSettings(quantitative_maps=False, colour_maps=False)
    written = write_perfusion_outputs(data, tmp_path, settings)
    sr_series = by_kind(written, "sr", "synthetic")
    sr = hd.sr.srread(sr_series.paths[0])
    groups = {g.tracking_identifier: g for g in _measurement_groups(sr)}
    assert set(groups) == {"Core rCBF<30%", "Tmax>6s", "Tmax>10s", "Hypoperfusion intensity ratio"}
    assert not groups["Core rCBF<30%"].get_measurements()  # looked for, not measured: "Indeterminate"
    (evaluation,) = groups["Core rCBF<30%"].get_qualitative_evaluations()
    assert (evaluation.value.value, evaluation.value.scheme_designator) == ("82334004", "SCT")
    assert "Core rCBF<30%" in sr_series.notes[0] and "withheld" in sr_series.notes[0]
    # The reason is in the SR's content, where a reader of the report finds it.
    texts = list(_sr_texts(sr))
    assert any(reason in text for text in texts), texts
    assert dciodvfy_errors(sr_series.paths[0]) == []
    seg_series = by_kind(written, "seg", "synthetic")
    seg = hd.seg.segread(seg_series.paths[0])
    labels = [seg.get_segment_description(n).segment_label for n in seg.segment_numbers]
    assert labels == ["Tmax>6s", "Tmax>10s"]  # the core mask is not drawn in PACS without its number
    assert "left out (volume withheld): Core rCBF<30%" in seg_series.notes
    assert dciodvfy_errors(seg_series.paths[0]) == []
    report = pydicom.dcmread(by_kind(written, "qa_report", "both").paths[0])
    assert report.pixel_array.ndim == 3


def _sr_items(item):
    """Every content item below ``item`` in an SR content tree."""
    for child in item.get("ContentSequence", []):
        yield child
        yield from _sr_items(child)


def _sr_texts(item):
    """Every TEXT value of an SR content tree."""
    for child in item.get("ContentSequence", []):
        if child.get("ValueType") == "TEXT":
            yield str(child.TextValue)
        yield from _sr_texts(child)


def test_every_volume_withheld_writes_no_seg_and_a_report_that_says_withheld(reference_files, tmp_path):
    from ctp_node.series.outputs.qa_report import _volumes_text

    withheld = {"core": "noise", "tmax6": "sampling", "tmax10": "sampling"}
    analysis = make_analysis(
        core_volume_ml=None, tmax6_volume_ml=None, tmax10_volume_ml=None, mismatch_volume_ml=None,
        mismatch_ratio=None, hypoperfusion_intensity_ratio=None, withheld=withheld,
    )  # fmt: skip
    data = make_input(reference_files, synthetic=analysis, acquired=None)
    settings = PerfusionOutputSettings(quantitative_maps=False, colour_maps=False)
    written = write_perfusion_outputs(data, tmp_path, settings)
    assert not [s for s in written if s.kind == "seg"]
    assert {s.kind for s in written} == {"sr", "qa_report"}
    sr_path = by_kind(written, "sr", "synthetic").paths[0]
    assert len(_measurement_groups(hd.sr.srread(sr_path))) == 3 and dciodvfy_errors(sr_path) == []
    text = _volumes_text(analysis, None)
    for row in ("core, rCBF < 30 %", "Tmax > 6 s", "mismatch ratio", "hypoperfusion intensity ratio"):
        line = next(line for line in text.splitlines() if line.startswith(row))
        assert line.rstrip().endswith("withheld"), line


def test_the_core_range_under_the_study_noise_is_the_sr_measurement_uncertainty(reference_files, tmp_path):
    from ctp_node.perfusion.reliability import NoiseRange

    core_ml = make_analysis().core_volume_ml
    noise = NoiseRange(low_ml=core_ml - 1.5, high_ml=core_ml + 2.0, uncertain_ml=3.0, replicates=8)
    analysis = make_analysis(noise={"core": noise})
    data = make_input(reference_files, synthetic=analysis, acquired=None)
    settings = PerfusionOutputSettings(quantitative_maps=False, colour_maps=False)
    written = write_perfusion_outputs(data, tmp_path, settings)
    sr_path = by_kind(written, "sr", "synthetic").paths[0]
    groups = {g.tracking_identifier: g for g in _measurement_groups(hd.sr.srread(sr_path))}
    (core,) = groups["Core rCBF<30%"].get_measurements()
    uncertainty = {"371886008": "upper", "371885007": "lower"}  # SCT, TID 310's measurement uncertainty
    values = {
        uncertainty[item.ConceptNameCodeSequence[0].CodeValue]: float(item.MeasuredValueSequence[0].NumericValue)
        for item in _sr_items(core[0])
        if item.ValueType == "NUM" and item.ConceptNameCodeSequence[0].CodeValue in uncertainty
    }
    assert values == {"upper": 2.0, "lower": 1.5}, values
    (tmax6,) = groups["Tmax>6s"].get_measurements()
    assert not any(i.ConceptNameCodeSequence[0].CodeValue in uncertainty for i in _sr_items(tmax6[0]))
    assert dciodvfy_errors(sr_path) == []
