"""The perfusion outputs as a stroke reader sees them in a DICOM viewer (issue 25): orientation markers,
spacing, image and text size, slice positions, display smoothing, windowing; the QA report's layout.

Image checks read the written pixels back; the QA report's layout is checked on its matplotlib figure
(where each legend and text lies), its emptiness on the rendered page."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from matplotlib import colormaps

from ctp_node.config import PerfusionOutputSettings
from ctp_node.series.outputs import colour as colour_module
from ctp_node.series.outputs import write_perfusion_outputs
from ctp_node.series.outputs.colour import write_colour_series
from ctp_node.series.outputs.common import identity
from ctp_node.series.outputs.qa_report import render_report
from ctp_node.series.outputs.styles import MAP_STYLES
from tests.dciodvfy import dciodvfy_errors
from tests.series.outputs_cases import SHAPE, SOURCE_UID, make_analysis, make_input, write_reference_files

CAUTION_YELLOW = (255, 210, 0)
COLOUR_ONLY = PerfusionOutputSettings(
    quantitative_maps=False, structured_report=False, segmentation=False, qa_report=False, from_acquired=False
)


@pytest.fixture(scope="module")
def reference_files(tmp_path_factory) -> list[Path]:
    return write_reference_files(tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="module")
def headers(reference_files) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in reference_files]


@pytest.fixture(scope="module")
def colour_tmax(reference_files, tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("colour")
    written = write_perfusion_outputs(make_input(reference_files, acquired=None), out, COLOUR_ONLY)
    return list(next(s for s in written if s.kind == "colour_map" and s.name == "tmax").paths)


def _colour_series(headers, tmp_path: Path, name: str = "tmax", analysis=None) -> list[pydicom.Dataset]:
    ident = identity(SOURCE_UID, 1, "colour_map", "synthetic", name, 105, f"{name} colour")
    series = write_colour_series(analysis or make_analysis(), MAP_STYLES[name], headers, ident, tmp_path)
    return [pydicom.dcmread(p) for p in series.paths]


def _display_grid(ds: pydicom.Dataset, reference: pydicom.Dataset) -> tuple[int, int]:
    """(zoom, first row of the map area): the map fills the image's bottom rows below the title band."""
    zoom = round(float(reference.PixelSpacing[0]) / float(ds.PixelSpacing[0])) if "PixelSpacing" in ds else 1
    return zoom, int(ds.Rows) - SHAPE[1] * zoom


def test_colour_maps_carry_pixel_spacing_and_are_large_enough_to_read(colour_tmax, headers):
    for path, reference in zip(colour_tmax, headers):
        ds = pydicom.dcmread(path)
        assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
        assert "WindowCenter" not in ds and "WindowWidth" not in ds  # colour: no window for a viewer to apply
        assert "PixelSpacing" in ds, "a viewer cannot measure on the colour map"
        zoom = float(reference.PixelSpacing[0]) / float(ds.PixelSpacing[0])
        assert zoom == pytest.approx(round(zoom)) and zoom >= 1  # true mm: the map resampled by a whole factor
        assert float(reference.PixelSpacing[1]) / float(ds.PixelSpacing[1]) == pytest.approx(zoom)
        assert min(ds.Rows, ds.Columns) >= 512, f"{ds.Rows} x {ds.Columns}: a stamp on a PACS tile"
        assert ds.Columns >= round(zoom) * SHAPE[2] and ds.Rows >= round(zoom) * SHAPE[1]
        assert list(ds.PatientOrientation) == ["L", "P"]
    assert dciodvfy_errors(colour_tmax[0]) == []


def test_colour_map_text_is_at_least_14_px(colour_tmax):
    """The caution line is capitals only: its cap height is ~0.7 of the font size (10 px at 14 px). It is
    the first yellow text from the top (the band is above the map, whose colours include yellow)."""
    rgb = pydicom.dcmread(colour_tmax[1]).pixel_array.astype(int)
    rows = np.flatnonzero((np.abs(rgb - np.array(CAUTION_YELLOW)).sum(axis=-1) < 60).any(axis=1))
    assert rows.size, "no caution text"
    gaps = np.flatnonzero(np.diff(rows) > 3)  # the first line of text ends at the first gap of a few rows
    last = rows[gaps[0]] if gaps.size else rows[-1]
    height = int(last - rows[0] + 1)
    assert height >= 10, f"caution text {height} px high"


def test_orientation_markers_follow_the_image_orientation(headers, tmp_path):
    """Patient's right on the image's left for a standard axial image; a flipped row direction
    (ImageOrientationPatient -1\\0\\0\\0\\1\\0, patient's left at the image's left) moves the letters."""
    flipped = []
    for header in headers:
        ds = copy.deepcopy(header)
        ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
        flipped.append(ds)
    standard = _colour_series(headers, tmp_path / "standard")[1].pixel_array
    mirrored = _colour_series(flipped, tmp_path / "flipped")[1].pixel_array
    assert standard.shape == mirrored.shape
    assert not np.array_equal(standard, mirrored), "nothing on the image depends on its orientation"

    from ctp_node.series.outputs.colour import colour_layout, orientation_markers

    assert orientation_markers(headers[1]) == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    assert orientation_markers(flipped[1])["left"] == "L" and orientation_markers(flipped[1])["right"] == "R"
    boxes = colour_layout(*SHAPE[1:]).marker_boxes()

    def crop(rgb, edge):
        left, top, right, bottom = boxes[edge]
        return rgb[top:bottom, left:right]

    # The same letter ("R") at the left of the standard image and at the right of the flipped one.
    np.testing.assert_array_equal(crop(standard, "left"), crop(mirrored, "right"))
    np.testing.assert_array_equal(crop(standard, "right"), crop(mirrored, "left"))
    assert not np.array_equal(crop(standard, "left"), crop(standard, "right"))  # R and L differ
    for edge in ("left", "right", "top", "bottom"):
        assert (crop(standard, edge).sum(axis=-1) > 600).any(), f"{edge} marker without a letter"


def test_colour_map_title_gives_slice_number_and_position_in_mm(headers, tmp_path, monkeypatch):
    titles = []
    render = colour_module.render_slice

    def spy(values, style, inside, title, *args, **kwargs):
        titles.append(title)
        return render(values, style, inside, title, *args, **kwargs)

    monkeypatch.setattr(colour_module, "render_slice", spy)
    _colour_series(headers, tmp_path)
    positions = [float(h.SliceLocation) for h in headers]
    assert len(titles) == len(headers)
    for z, (title, position) in enumerate(zip(titles, positions)):
        assert f"slice {z + 1}/{len(headers)}" in title
        assert f"{position:+.1f} mm" in title, title


def test_colour_map_display_is_smoothed_and_the_quantitative_map_is_not(headers, reference_files, tmp_path):
    """A noisy map on 1 mm pixels: between neighbouring voxels the displayed colours vary far less than
    the raw map's colours would; the quantitative series keeps every voxel's value."""
    fine = []
    for header in headers:
        ds = copy.deepcopy(header)
        ds.PixelSpacing = [1.0, 1.0]
        fine.append(ds)
    analysis = make_analysis()
    ds = _colour_series(fine, tmp_path / "colour", "cbf", analysis)[1]
    rgb = ds.pixel_array.astype(float)
    style = MAP_STYLES["cbf"]
    raw = colormaps[style.colormap]((analysis.cbf[1] - style.low) / (style.high - style.low))[..., :3] * 255
    zoom, top = _display_grid(ds, fine[1])
    shown = rgb[top + zoom // 2 :: zoom, zoom // 2 :: zoom][: SHAPE[1], : SHAPE[2]]  # at the voxels' centres
    interior = np.zeros(SHAPE[1:], dtype=bool)
    interior[14:34, 10:30] = True  # well inside the brain disc, away from the markers
    pairs = interior[:, 1:] & interior[:, :-1]

    def roughness(image):
        return np.abs(np.diff(image, axis=1)).sum(axis=-1)[pairs].mean()

    assert roughness(shown) < 0.5 * roughness(raw), (roughness(shown), roughness(raw))
    settings = PerfusionOutputSettings(colour_maps=False, structured_report=False, segmentation=False, qa_report=False)
    written = write_perfusion_outputs(make_input(reference_files, acquired=None), tmp_path / "maps", settings)
    cbf = pydicom.dcmread(next(s for s in written if s.name == "cbf").paths[1])
    values = cbf.pixel_array * float(cbf.RescaleSlope)
    np.testing.assert_allclose(values, analysis.cbf[1], atol=style.slope / 2 + 1e-6)  # unsmoothed
    assert float(cbf.WindowWidth) == style.high - style.low  # grayscale: a window for the viewer


# --- QA report ---------------------------------------------------------------------------------------


def _empty_share(rgb: np.ndarray, tile: int = 50) -> float:
    """Share of the page's 50 x 50 px tiles that are plain white."""
    height, width = rgb.shape[:2]
    tiles = [
        bool((rgb[y : y + tile, x : x + tile] >= 250).all())
        for y in range(0, height - tile + 1, tile)
        for x in range(0, width - tile + 1, tile)
    ]
    return float(np.mean(tiles))


def test_qa_report_leaves_little_of_the_page_empty(reference_files):
    share = _empty_share(render_report(make_input(reference_files)))
    assert share < 0.2, f"{share:.0%} of the page is empty"  # the first layout left 49 % white


def _figure(data):
    from ctp_node.series.outputs.qa_report import build_report

    fig = build_report(data)
    fig.canvas.draw()
    return fig, fig.canvas.get_renderer()


def _axes(fig, gid: str):
    found = [ax for ax in fig.axes if ax.get_gid() == gid]
    assert found, f"no axes {gid!r} among {[ax.get_gid() for ax in fig.axes]}"
    return found[0]


def _texts(ax) -> list:
    """Every text of an axes: its own, titles, axis labels, tick labels, legend."""
    texts = [*ax.texts, ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label]
    texts += [*ax.get_xticklabels(), *ax.get_yticklabels()]
    return texts + (ax.get_legend().get_texts() if ax.get_legend() else [])


def test_qa_report_curve_legend_hides_no_curve(reference_files):
    fig, renderer = _figure(make_input(reference_files))
    for gid in ("tissue_curves", "vessel_curves"):
        ax = _axes(fig, gid)
        legend = ax.get_legend()
        assert legend is not None
        box, axes_box = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
        assert not box.overlaps(axes_box), f"the {gid} legend lies over its curves"
        for other in fig.axes:  # nor over a neighbour's
            if other is not ax and other.get_visible():
                assert not box.overlaps(other.get_window_extent(renderer)), f"{gid} legend over {other.get_gid()}"
    # The normal tissue's peak in particular is inside the axes and outside every legend.
    ax = _axes(fig, "tissue_curves")
    line = ax.get_lines()[0]
    peak = np.argmax(line.get_ydata())
    x, y = ax.transData.transform((line.get_xdata()[peak], line.get_ydata()[peak]))
    assert ax.get_window_extent(renderer).contains(x, y)
    assert not ax.get_legend().get_window_extent(renderer).contains(x, y)


def test_qa_report_overlays_name_their_slice_in_mm_and_the_patients_sides(reference_files, headers):
    fig, _ = _figure(make_input(reference_files))
    positions = [float(h.SliceLocation) for h in headers]
    for mask in ("core", "tmax6"):
        for z in range(SHAPE[0]):
            ax = _axes(fig, f"overlay_{mask}_{z}")
            assert ax.get_title() == f"slice {z + 1}/{SHAPE[0]}, z = {positions[z]:+.1f} mm"
        first = {t.get_text() for t in _axes(fig, f"overlay_{mask}_0").texts}
        assert {"R", "L"} <= first  # standard axial: patient's right at the image's left
    maps = {t.get_text() for ax in fig.axes for t in ax.texts}
    assert any(f"z = {positions[1]:+.1f} mm" in text for text in maps)  # the maps' slice (the lesion's)


def test_qa_report_states_the_volumes_in_large_type(reference_files):
    analysis = make_analysis()
    fig, _ = _figure(make_input(reference_files))
    expected = {
        "headline_core": f"{analysis.core_volume_ml:.1f} mL",
        "headline_tmax6": f"{analysis.tmax6_volume_ml:.1f} mL",
        "headline_mismatch": f"{analysis.mismatch_volume_ml:.1f} mL",
        "headline_mismatch_ratio": f"{analysis.mismatch_ratio:.1f}",
    }
    for gid, value in expected.items():
        big = [t for t in _axes(fig, gid).texts if t.get_fontsize() >= 24]
        assert [t.get_text() for t in big] == [value], gid
    small = min(t.get_fontsize() for ax in fig.axes for t in _texts(ax) if t.get_text())
    assert small >= 10  # 14 px at 100 dpi


def test_qa_report_says_withheld_with_the_reason_and_the_invalid_share(reference_files):
    reason = "12 mL of core (rCBF < 30 %) in the less affected hemisphere"
    valid = {name: np.ones(SHAPE, dtype=bool) for name in ("cbf", "cbv", "mtt", "tmax")}
    valid["cbv"] = valid["cbv"].copy()
    brain = make_analysis().brain_mask
    valid["cbv"][0] = False  # a third of the brain: slice 0 of 3
    analysis = make_analysis(
        core_volume_ml=None, mismatch_volume_ml=None, mismatch_ratio=None, withheld={"core": reason}, valid=valid
    )
    fig, _ = _figure(make_input(reference_files, synthetic=analysis, acquired=None))
    core = [t.get_text() for t in _axes(fig, "headline_core").texts]
    assert "withheld" in core and any("core withheld: 12 mL of core" in t for t in core), core
    assert "withheld" in [t.get_text() for t in _axes(fig, "headline_mismatch_ratio").texts]
    share = round(100 * brain[0].sum() / brain.sum())
    validity = "\n".join(t.get_text() for t in _axes(fig, "validity").texts)
    assert f"synthetic     0{share:>5}    0    0" in validity, validity
    notes = "\n".join(t.get_text() for t in _axes(fig, "notes").texts)
    assert reason in notes.replace("\n", " ")


def test_qa_report_shows_at_most_a_row_of_slices_with_the_lesions_among_them():
    from ctp_node.series.outputs.qa_report import MAX_SLICES, display_slice, shown_slices

    shape = (20, *SHAPE[1:])
    tmax6 = np.zeros(shape, dtype=bool)
    tmax6[13, 20:30, 20:30] = True
    brain = np.zeros(shape, dtype=bool)
    brain[2:18, 10:40, 10:40] = True  # slices 0-1 and 18-19 hold no brain
    analysis = make_analysis(tmax6_mask=tmax6, brain_mask=brain, cbf=np.zeros(shape))
    slices = shown_slices(analysis)
    assert len(slices) == MAX_SLICES and display_slice(analysis) == 13 and 13 in slices
    assert min(slices) >= 2 and max(slices) <= 17 and slices == sorted(set(slices))
    assert shown_slices(make_analysis()) == [0, 1, 2]


def test_qa_report_secondary_capture_is_a_page_without_patient_directions(reference_files, tmp_path):
    only_report = PerfusionOutputSettings(
        quantitative_maps=False, colour_maps=False, structured_report=False, segmentation=False
    )
    written = write_perfusion_outputs(make_input(reference_files), tmp_path, only_report, png_dir=tmp_path)
    ds = pydicom.dcmread(written[0].paths[0])
    assert ds.PhotometricInterpretation == "RGB" and "WindowCenter" not in ds
    assert not ds.get("PatientOrientation") and "PixelSpacing" not in ds  # a page, not a view of the patient
    assert dciodvfy_errors(written[0].paths[0]) == []
