"""Colour maps as Secondary Capture images with a scale bar, for any viewer (one series per map).

Each slice is one RGB image: a title band with the burned-in research-use caution, the map through a
colour lookup table (black outside the brain and where a voxel has no value), and a colour scale bar
with the unit. Rendering is numpy (lookup table) plus Pillow text, computed once per series for the
bar: matplotlib per slice would cost ~0.1 s per image (128 images per job). The images carry no
patient geometry (the band and bar change the pixel grid); the quantitative maps carry it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from ctp_node.files import fsync_dir
from ctp_node.series.outputs.common import (
    RESEARCH_NOTE,
    OutputSeries,
    SeriesIdentity,
    caution,
    equipment,
    save_atomic,
    series_folder,
    source_image,
)
from ctp_node.series.outputs.inputs import PerfusionAnalysis
from ctp_node.series.outputs.styles import MapStyle

BAND_PX = 40
BAR_PX = 110
BACKGROUND = (0, 0, 0)
TEXT = (255, 255, 255)
CAUTION_TEXT = (255, 210, 0)


@lru_cache(maxsize=8)
def colour_table(colormap: str) -> np.ndarray:
    """(256, 3) uint8 RGB of a matplotlib colour map."""
    from matplotlib import colormaps

    return (colormaps[colormap](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)


@lru_cache(maxsize=4)
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


@lru_cache(maxsize=16)
def scale_bar(style: MapStyle, height: int) -> np.ndarray:
    """(height, BAR_PX, 3) uint8: a vertical colour bar (high at the top) with ticks and the unit."""
    image = Image.new("RGB", (BAR_PX, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    size = max(10, height // 36)
    font = _font(size)
    top, bottom, left, width = max(int(height * 0.12), 2 * size + 4), int(height * 0.88), 12, 22
    rows = np.linspace(1.0, 0.0, bottom - top)
    table = colour_table(style.colormap)[np.clip(np.rint(rows * 255), 0, 255).astype(int)]
    image.paste(Image.fromarray(np.repeat(table[:, None, :], width, axis=1)), (left, top))
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = int(round(bottom - 1 - fraction * (bottom - top - 1)))
        value = style.low + fraction * (style.high - style.low)
        draw.line([(left + width, y), (left + width + 5, y)], fill=TEXT)
        draw.text((left + width + 8, y), f"{value:g}", fill=TEXT, font=font, anchor="lm")
    draw.text((left, top - size // 2), style.unit, fill=TEXT, font=font, anchor="ld")
    return np.asarray(image)


def render_slice(values: np.ndarray, style: MapStyle, inside: np.ndarray | None, title: str) -> np.ndarray:
    """One Secondary Capture image: caution band, coloured map, scale bar."""
    rgb = colourise(values, style, inside)
    n_y, n_x = rgb.shape[:2]
    canvas = np.zeros((BAND_PX + n_y, n_x + BAR_PX, 3), dtype=np.uint8)
    canvas[BAND_PX:, :n_x] = rgb
    canvas[BAND_PX:, n_x:] = scale_bar(style, n_y)
    band = Image.new("RGB", (n_x + BAR_PX, BAND_PX), BACKGROUND)
    draw = ImageDraw.Draw(band)
    font = _font(max(9, min(BAND_PX // 3, (n_x + BAR_PX) // 40)))  # the caution fits small matrices too
    draw.text((6, BAND_PX // 4), title, fill=TEXT, font=font, anchor="lm")
    draw.text((6, 3 * BAND_PX // 4), RESEARCH_NOTE, fill=CAUTION_TEXT, font=font, anchor="lm")
    canvas[:BAND_PX] = np.asarray(band)
    return canvas


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
    reference: Dataset, rgb: np.ndarray, ident: SeriesIdentity, number: int, comment: str, image_type: str
) -> Dataset:
    """A Secondary Capture (RGB) of ``rgb`` with the patient and study of ``reference`` (highdicom)."""
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
        manufacturer="ctp-node",
        patient_orientation=patient_orientation(reference),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
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
    folder = series_folder(out_dir, f"{analysis.label.split()[0].lower()}_{style.name}_colour")
    notes = (f"{missing} voxels without a value (NaN) shown black",) if missing else ()
    comment = caution(
        f"{style.title} colour map ({style.unit}, scale {style.low:g}-{style.high:g}) of the {analysis.label} series."
        + (f" {notes[0]}." if notes else "")
    )
    inside = None if analysis.brain_mask is None else np.asarray(analysis.brain_mask, dtype=bool)
    n_z = values.shape[0]
    paths = []
    for z, reference in enumerate(references):
        title = f"{style.title} ({style.unit})  {analysis.label}  slice {z + 1}/{n_z}"
        rgb = render_slice(values[z], style, None if inside is None else inside[z], title)
        sc = secondary_capture(reference, rgb, ident, z + 1, comment, style.title.upper())
        paths.append(save_atomic(sc, folder / f"{style.name.upper()}_RGB_{z:03d}.dcm"))
    fsync_dir(folder)
    return OutputSeries(
        "colour_map", analysis.label.split()[0].lower(), style.name, ident.series_uid, ident.series_number,
        ident.description, folder, tuple(paths), notes,
    )  # fmt: skip
