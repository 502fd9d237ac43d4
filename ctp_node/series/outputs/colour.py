"""Colour maps as Secondary Capture images with a scale bar, for any viewer (one series per map).

Each slice is one RGB image: a title band (map, analysis, slice number and position in mm, how the
display was made, the burned-in research-use caution), the map through a colour lookup table (black
outside the brain and where a voxel has no value) with the patient's orientation burned in at its
edges (R/L, A/P from ImageOrientationPatient: a Secondary Capture's PatientOrientation is shown by few
viewers), and a colour scale bar with the unit. Rendering is numpy/scipy (lookup table, resampling)
plus Pillow text, computed once per series for the bar: matplotlib per slice would cost ~0.1 s per
image (128 images per job).

Display, not measurement: a map is smoothed (Gaussian, ``DISPLAY_FWHM_MM``, within the brain only) and
resampled bilinearly so that its short side has at least ``MIN_DISPLAY_PX`` pixels; both are stated on
the image and in ImageComments. The quantitative map series carry the unsmoothed values on the
acquisition grid. PixelSpacing is the reference's divided by the display zoom, so a viewer's distance
tool measures true mm on the map; the band and bar change the grid, so the images carry no
ImagePositionPatient (a Secondary Capture has none), only PatientOrientation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from scipy import ndimage

from ctp_node.files import fsync_dir
from ctp_node.series.node_dicom import NODE_MANUFACTURER, equipment
from ctp_node.series.outputs.common import (
    RESEARCH_NOTE,
    OutputSeries,
    SeriesIdentity,
    caution,
    save_atomic,
    series_folder,
    source_image,
)
from ctp_node.series.outputs.inputs import PerfusionAnalysis
from ctp_node.series.outputs.styles import MapStyle

# A PACS tile shows a 64 x 64 or 128 x 128 map as a blur of blocks or a stamp with unreadable text:
# the map area is resampled to at least this many pixels on its short side (512: a CT image's size).
MIN_DISPLAY_PX = 512
# Display-only smoothing: a perfusion map's voxel noise (deconvolution of noisy curves) reads as
# mottling that hides the lesion's outline; vendor consoles smooth their maps by a few mm as well.
DISPLAY_FWHM_MM = 3.0
MIN_FONT_PX = 18  # >= 14 px text: readable at 1:1 on a reading-room monitor
BACKGROUND = (0, 0, 0)
TEXT = (255, 255, 255)
NOTE_TEXT = (190, 190, 190)
CAUTION_TEXT = (255, 210, 0)
MARKER_TEXT = (255, 255, 255)
MARKER_BOX = (40, 40, 40)


@dataclass(frozen=True)
class ColourLayout:
    """Where the parts of one colour image lie: band on top, map (zoomed) at left below it, bar at right."""

    n_y: int  # the map's matrix
    n_x: int
    zoom: int  # display pixels per map pixel, both axes
    font_px: int
    band_px: int
    bar_px: int

    @property
    def map_shape(self) -> tuple[int, int]:
        return self.n_y * self.zoom, self.n_x * self.zoom

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of the whole image."""
        return self.band_px + self.n_y * self.zoom, self.n_x * self.zoom + self.bar_px

    def marker_boxes(self) -> dict[str, tuple[int, int, int, int]]:
        """(left, top, right, bottom) of each orientation marker's box in image pixels, by edge."""
        height, width = self.map_shape
        size = self.marker_px
        pad = max(4, size // 5)
        middle_y, middle_x = self.band_px + height // 2 - size // 2, width // 2 - size // 2
        lowest = self.band_px + height - pad - size
        return {
            "left": (pad, middle_y, pad + size, middle_y + size),
            "right": (width - pad - size, middle_y, width - pad, middle_y + size),
            "top": (middle_x, self.band_px + pad, middle_x + size, self.band_px + pad + size),
            "bottom": (middle_x, lowest, middle_x + size, lowest + size),
        }

    @property
    def marker_px(self) -> int:
        """Side of a marker's square box: the letter at 1.2 x the text size, two letters for an oblique edge."""
        return int(round(2.2 * self.font_px))


def colour_layout(n_y: int, n_x: int) -> ColourLayout:
    """The layout of a map of ``n_y`` x ``n_x`` pixels: an integer zoom (PixelSpacing stays exact)."""
    zoom = max(1, math.ceil(MIN_DISPLAY_PX / max(1, min(n_y, n_x))))
    short = min(n_y, n_x) * zoom
    font = max(MIN_FONT_PX, round(short / 28))
    band = int(round(3 * 1.35 * font + 0.6 * font))  # three lines and a margin
    bar = int(round(7.5 * font))  # ticks and "mL/100 g/min" at the text size
    return ColourLayout(n_y, n_x, zoom, font, band, bar)


@lru_cache(maxsize=8)
def colour_table(colormap: str) -> np.ndarray:
    """(256, 3) uint8 RGB of a matplotlib colour map."""
    from matplotlib import colormaps

    return (colormaps[colormap](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def colourise(values: np.ndarray, style: MapStyle, inside: np.ndarray | None = None) -> np.ndarray:
    """(Y, X, 3) uint8: ``values`` through the style's colour table over its display range; black outside
    ``inside`` and where there is no value (NaN)."""
    values = np.asarray(values, dtype=np.float32)
    finite = np.isfinite(values)
    scaled = (np.where(finite, values, style.low) - style.low) / (style.high - style.low)
    index = np.clip(np.rint(scaled * 255), 0, 255).astype(np.uint8)
    rgb = colour_table(style.colormap)[index]
    shown = finite if inside is None else finite & inside
    rgb[~shown] = BACKGROUND
    return rgb


def display_values(
    values: np.ndarray, inside: np.ndarray | None, spacing_mm: tuple[float, float], zoom: int
) -> np.ndarray:
    """One slice of a map as shown: smoothed within the shown voxels, resampled ``zoom`` x; NaN where not shown.

    Normalised convolution (smooth value x mask, divide by the smoothed mask): the black background
    and voxels without a value never bleed into the tissue's colours, and the tissue's edge keeps its
    values. The brain's outline is smoothed and resampled as a fraction and cut at one half (no
    staircase at the edge); a voxel without a value stays black over all its display pixels."""
    values = np.asarray(values, dtype=np.float32)  # float32: a display needs no more, and it halves the time
    finite = np.isfinite(values)
    region = finite if inside is None else np.asarray(inside, dtype=bool)
    shown = finite & region
    if not shown.any():
        return np.full((values.shape[0] * zoom, values.shape[1] * zoom), np.nan, dtype=np.float32)
    weight = shown.astype(np.float32)
    filled = np.where(shown, values, np.float32(0.0))
    outline = region.astype(np.float32)
    sigma = [DISPLAY_FWHM_MM / 2.3548 / max(float(s), 1e-6) for s in spacing_mm]
    if max(sigma) >= 0.25:  # below a quarter pixel the filter changes nothing a reader could see
        numerator = ndimage.gaussian_filter(filled, sigma, mode="constant", truncate=3.0)
        denominator = ndimage.gaussian_filter(weight, sigma, mode="constant", truncate=3.0)
        filled = np.where(denominator > 1e-6, numerator / np.maximum(denominator, 1e-6), np.float32(0.0))
        same = np.array_equal(shown, region)  # no voxel without a value inside: one filter less
        outline = denominator if same else ndimage.gaussian_filter(outline, sigma, mode="constant", truncate=3.0)
    if zoom > 1:
        # Outside the shown region the normalised convolution has extended the tissue's values, so
        # the bilinear resampling at the edge does not mix in the background's zeros.
        filled = ndimage.zoom(filled, zoom, order=1, mode="nearest", grid_mode=True)
        outline = ndimage.zoom(outline, zoom, order=1, mode="nearest", grid_mode=True)
        finite = np.kron(finite, np.ones((zoom, zoom), dtype=bool))  # a voxel without a value: its own block
    return np.where((outline >= 0.5) & finite, filled, np.float32(np.nan)).astype(np.float32, copy=False)


@lru_cache(maxsize=16)
def scale_bar(style: MapStyle, height: int, width: int, font_px: int) -> np.ndarray:
    """(height, width, 3) uint8: a vertical colour bar (high at the top) with ticks and the unit."""
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = _font(font_px)
    left, bar_width = font_px // 2 + 4, max(16, int(1.2 * font_px))
    top, bottom = max(int(height * 0.10), 2 * font_px + 8), int(height * 0.92)
    rows = np.linspace(1.0, 0.0, bottom - top)
    table = colour_table(style.colormap)[np.clip(np.rint(rows * 255), 0, 255).astype(int)]
    image.paste(Image.fromarray(np.repeat(table[:, None, :], bar_width, axis=1)), (left, top))
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = int(round(bottom - 1 - fraction * (bottom - top - 1)))
        value = style.low + fraction * (style.high - style.low)
        draw.line([(left + bar_width, y), (left + bar_width + 6, y)], fill=TEXT, width=2)
        draw.text((left + bar_width + 10, y), f"{value:g}", fill=TEXT, font=font, anchor="lm")
    draw.text((left, top - font_px // 2), style.unit, fill=TEXT, font=font, anchor="ld")
    return np.asarray(image)


def orientation_letters(vector: np.ndarray) -> str:
    """The patient directions a direction cosine points to (LPS: +x Left, +y Posterior, +z Head), the
    dominant first, a second only when the plane is clearly oblique (as viewers label oblique edges)."""
    letters = (("R", "L"), ("A", "P"), ("F", "H"))
    vector = np.asarray(vector, dtype=np.float64)
    order = np.argsort(-np.abs(vector))
    out = ""
    for rank, axis in enumerate(order[:2]):
        if rank == 0 or abs(vector[axis]) >= 0.35:
            out += letters[axis][int(vector[axis] > 0)]
    return out


def orientation_markers(reference: Dataset) -> dict[str, str]:
    """The letters at each edge of the image of ``reference``: the row cosine points to the right edge
    (column index increasing), the column cosine to the bottom edge; the opposite edges the reverse.
    A plain axial image gives {"left": "R", "right": "L", "top": "A", "bottom": "P"}."""
    cosines = np.asarray(reference.ImageOrientationPatient, dtype=np.float64).reshape(2, 3)
    row, column = cosines
    return {
        "left": orientation_letters(-row),
        "right": orientation_letters(row),
        "top": orientation_letters(-column),
        "bottom": orientation_letters(column),
    }


def slice_position_mm(reference: Dataset) -> float:
    """Where the slice lies along its normal, in mm: SliceLocation when the image has it (what the
    scanner's own images and the derived series show), else ImagePositionPatient on the normal."""
    if "SliceLocation" in reference and reference.SliceLocation not in (None, ""):
        return float(reference.SliceLocation)
    cosines = np.asarray(reference.ImageOrientationPatient, dtype=np.float64).reshape(2, 3)
    normal = np.cross(cosines[0], cosines[1])
    return float(np.dot(np.asarray(reference.ImagePositionPatient, dtype=np.float64), normal))


def display_note(layout: ColourLayout) -> str:
    """How the shown image differs from the quantitative map (burned in and in ImageComments)."""
    zoom = f", shown {layout.zoom}x" if layout.zoom > 1 else ""
    return f"display: smoothed {DISPLAY_FWHM_MM:g} mm FWHM{zoom}; values in the quantitative series"


def render_slice(
    values: np.ndarray,
    style: MapStyle,
    inside: np.ndarray | None,
    title: str,
    *,
    spacing_mm: tuple[float, float] = (1.0, 1.0),
    markers: dict[str, str] | None = None,
) -> np.ndarray:
    """One Secondary Capture image: the band (title, display note, caution), the coloured map with its
    orientation markers, the scale bar."""
    n_y, n_x = np.shape(values)
    layout = colour_layout(n_y, n_x)
    shown = display_values(values, inside, spacing_mm, layout.zoom)
    rgb = colourise(shown, style)
    height, width = layout.map_shape
    rows, columns = layout.shape
    canvas = np.zeros((rows, columns, 3), dtype=np.uint8)
    canvas[layout.band_px :, :width] = rgb
    canvas[layout.band_px :, width:] = scale_bar(style, height, layout.bar_px, layout.font_px)
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    line = layout.band_px / 3.25
    lines = ((title, TEXT), (display_note(layout), NOTE_TEXT), (RESEARCH_NOTE, CAUTION_TEXT))
    for index, (text, colour) in enumerate(lines):
        font = _fitting_font(text, columns - 12, layout.font_px)
        draw.text((6, int(line * (index + 0.5) + 0.3 * layout.font_px)), text, fill=colour, font=font, anchor="lm")
    for edge, letters in (markers or {}).items():
        _draw_marker(draw, layout, edge, letters)
    return np.asarray(image)


def _fitting_font(text: str, width: int, size: int) -> ImageFont.ImageFont:
    """The text size, smaller only as far as the line needs to fit (never below 14 px)."""
    while size > 14 and _font(size).getlength(text) > width:
        size -= 1
    return _font(size)


def _draw_marker(draw: ImageDraw.ImageDraw, layout: ColourLayout, edge: str, letters: str) -> None:
    """One orientation letter (two for an oblique edge) on a dark box: readable over any colour."""
    left, top, right, bottom = layout.marker_boxes()[edge]
    draw.rectangle((left, top, right - 1, bottom - 1), fill=MARKER_BOX)
    size = int(round(1.2 * layout.font_px)) if len(letters) < 2 else layout.font_px
    draw.text(((left + right) / 2, (top + bottom) / 2), letters, fill=MARKER_TEXT, font=_font(size), anchor="mm")


def patient_orientation(reference: Dataset) -> tuple[str, str]:
    """PatientOrientation (row, column directions) of the reference's image plane, by the dominant axis
    of each direction cosine (LPS: +x Left, +y Posterior, +z Head); ("L", "P") for a plain axial image."""
    cosines = np.asarray(reference.ImageOrientationPatient, dtype=np.float64).reshape(2, 3)
    letters = (("R", "L"), ("A", "P"), ("F", "H"))
    out = []
    for vector in cosines:
        axis = int(np.argmax(np.abs(vector)))
        out.append(letters[axis][int(vector[axis] > 0)])
    return out[0], out[1]


def secondary_capture(
    reference: Dataset,
    rgb: np.ndarray,
    ident: SeriesIdentity,
    number: int,
    comment: str,
    image_type: str,
    *,
    pixel_spacing: tuple[float, float] | None = None,
    oriented: bool = True,
) -> Dataset:
    """A Secondary Capture (RGB) of ``rgb`` with the patient and study of ``reference`` (highdicom).

    ``pixel_spacing`` (row, column mm): the image is a picture of the patient at that scale (the SC
    Image module's Basic Pixel Spacing Calibration macro: PixelSpacing may be present on an image not
    calibrated against a fiducial, and viewers then measure in mm). ``oriented``: the image's rows and
    columns run along the reference's (PatientOrientation); False for a page such as the QA report,
    whose PatientOrientation is then empty (Type 2C) so that no viewer labels it with directions."""
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=reference,
        pixel_array=np.ascontiguousarray(rgb),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",  # with PatientOrientation only: the band and bar change the grid
        series_instance_uid=ident.series_uid,
        series_number=ident.series_number,
        sop_instance_uid=ident.instance_uid(number),
        instance_number=number,
        manufacturer=NODE_MANUFACTURER,
        patient_orientation=patient_orientation(reference),
        pixel_spacing=pixel_spacing,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    if not oriented:
        sc.PatientOrientation = None
    equipment(sc)
    sc.SeriesDescription = ident.description
    sc.ImageType = ["DERIVED", "SECONDARY", image_type]
    sc.BurnedInAnnotation = "YES"  # the caution; no patient identity is drawn
    sc.ImageComments = comment
    sc.ConversionType = "WSD"  # workstation
    sc.SourceImageSequence = source_image(reference)
    copied = ("StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "BodyPartExamined")
    for keyword in copied:
        if keyword in reference and not sc.get(keyword):
            sc[keyword] = reference[keyword]
    if "BodyPartExamined" not in sc:
        sc.Laterality = None  # Type 2C: a head is unpaired, but an unknown body part may be paired
    return sc


def write_colour_series(
    analysis: PerfusionAnalysis, style: MapStyle, references: list[Dataset], ident: SeriesIdentity, out_dir: Path
) -> OutputSeries:
    """One colour Secondary Capture per slice of one map into ``out_dir/<folder>``."""
    values = np.asarray(analysis.map(style.name))
    missing = int(np.count_nonzero(~np.isfinite(values)))
    folder = series_folder(out_dir, f"{analysis.kind.value}_{style.name}_colour")
    notes = (f"{missing} voxels without a value (NaN) shown black",) if missing else ()
    n_z, n_y, n_x = values.shape
    layout = colour_layout(n_y, n_x)
    comment = caution(
        f"{style.title} colour map ({style.unit}, scale {style.low:g}-{style.high:g}) of the {analysis.label} series, "
        f"for display: smoothed (Gaussian, {DISPLAY_FWHM_MM:g} mm FWHM, within the brain) and resampled "
        f"{layout.zoom}x (bilinear); the quantitative {style.title} series carries the unsmoothed values."
        + (f" {notes[0]}." if notes else "")
    )
    inside = None if analysis.brain_mask is None else np.asarray(analysis.brain_mask, dtype=bool)
    paths = []
    for z, reference in enumerate(references):
        spacing = _spacing(reference)
        title = (
            f"{style.title} ({style.unit})   {analysis.label}   slice {z + 1}/{n_z}, "
            f"z = {slice_position_mm(reference):+.1f} mm"
        )
        rgb = render_slice(
            values[z], style, None if inside is None else inside[z], title, spacing_mm=spacing,
            markers=orientation_markers(reference),
        )  # fmt: skip
        sc = secondary_capture(
            reference, rgb, ident, z + 1, comment, style.title.upper(),
            pixel_spacing=(spacing[0] / layout.zoom, spacing[1] / layout.zoom),
        )  # fmt: skip
        paths.append(save_atomic(sc, folder / f"{style.name.upper()}_RGB_{z:03d}.dcm"))
    fsync_dir(folder)
    return OutputSeries(
        "colour_map", analysis.kind.value, style.name, ident.series_uid, ident.series_number,
        ident.description, folder, tuple(paths), notes,
    )  # fmt: skip


def _spacing(reference: Dataset) -> tuple[float, float]:
    """(row, column) spacing in mm of the reference image (read_references checked that it is there)."""
    row, column = (float(v) for v in reference.PixelSpacing)
    return row, column
