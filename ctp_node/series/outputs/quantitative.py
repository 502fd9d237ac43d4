"""Quantitative maps (CBF, CBV, MTT, Tmax) as derived CT images with rescale and units, one series per map.

Why CT Image Storage rather than the Parametric Map IOD: every PACS viewer displays CT images, windows
them and reads the value under the cursor through RescaleSlope/Intercept (as the perfusion maps of
scanner consoles reach PACS); Parametric Map objects (float pixels) are displayed by OHIF 3, 3D Slicer
and a few research viewers, not by most clinical PACS viewers, nor previewed by Orthanc. The unit is
stated three ways: SeriesDescription and ImageComments for people, RealWorldValueMappingSequence (UCUM
code, the value = stored * slope) for software that reads it; RescaleType is "US" (unspecified), since
CT's defined terms name no perfusion unit.

Pixels: signed 16-bit, value = stored * ``MapStyle.slope`` (0.1 mL/100 g/min, 0.01 mL/100 g, 0.01 s):
finer than any map's precision, and the range covers any physiological value. Voxels without a value
(NaN/inf) are stored as the padding value -32768 (PixelPaddingValue), which viewers leave black;
values beyond the range are clipped. Both are counted in the series' notes and in ImageComments.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DSfloat

from ctp_node.files import fsync_dir
from ctp_node.series.node_dicom import NODE_MANUFACTURER, ST_MAX, code_item, equipment
from ctp_node.series.outputs.common import (
    OutputSeries,
    SeriesIdentity,
    caution,
    referenced_series,
    save_atomic,
    series_folder,
    source_image,
)
from ctp_node.series.outputs.inputs import PerfusionAnalysis
from ctp_node.series.outputs.styles import MapStyle

PADDING = -32768
STORED_MAX = 32767
# Attributes of the reference image that do not hold for a map of the whole series.
DROPPED = (
    "TemporalPositionIdentifier", "NumberOfTemporalPositions", "PixelPaddingValue", "PixelPaddingRangeLimit",
    "SourceImageSequence", "ReferencedSeriesSequence", "DerivationDescription", "ImageComments", "WindowCenter",
    "WindowWidth", "WindowCenterWidthExplanation", "PixelData", "RescaleType", "ContributingEquipmentSequence",
    "LossyImageCompressionRatio", "LossyImageCompressionMethod",
)  # fmt: skip


def stored_values(values: np.ndarray, slope: float) -> tuple[np.ndarray, int, int]:
    """int16 stored values of a map, the number of voxels without a value (padding) and of clipped ones."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    scaled = np.rint(np.where(finite, values, 0.0) / slope)
    clipped = int(np.count_nonzero(finite & ((scaled < PADDING + 1) | (scaled > STORED_MAX))))
    stored = np.clip(scaled, PADDING + 1, STORED_MAX).astype(np.int16)
    stored[~finite] = PADDING
    return stored, int(np.count_nonzero(~finite)), clipped


def write_map_series(
    analysis: PerfusionAnalysis,
    style: MapStyle,
    references: list[Dataset],
    ident: SeriesIdentity,
    out_dir: Path,
    *,
    source_series_uid: str,
    reference_is_source: bool,
) -> OutputSeries:
    """One map of ``analysis`` as CT images, one per slice, into ``out_dir/<folder>``.

    ``reference_is_source``: the reference images are what the map was computed from (the synthetic
    series), so each image names its slice's reference image in SourceImageSequence."""
    stored, missing, clipped = stored_values(analysis.map(style.name), style.slope)
    folder = series_folder(out_dir, f"{analysis.kind.value}_{style.name}")
    what = (
        f"{style.title} map ({style.unit}; value = pixel x {style.slope:g}) from perfusion analysis of the "
        f"{analysis.label} series"
    )
    notes = []
    if missing:
        notes.append(f"{missing} voxels without a value (NaN) stored as padding {PADDING}")
    if clipped:
        notes.append(f"{clipped} voxels beyond the signed 16-bit range clipped")
    invalid = analysis.invalid_fraction(style.name)
    if invalid:
        # The pixels are unchanged (viewers and readers see what they saw before); the share without a
        # value the data support is said in words, the masks are in the job's summary and volumes.json.
        notes.append(f"{100 * invalid:.1f} % of the analysed tissue without a value the data support (validity masks)")
    comment = caution(f"{what}." + (f" {'; '.join(notes)}." if notes else ""))
    paths = []
    for z, reference in enumerate(references):
        ds = _image(reference, analysis, style, ident, z, comment, source_series_uid, reference_is_source)
        ds.add_new("PixelData", "OW", np.ascontiguousarray(stored[z], dtype="<i2").tobytes())
        paths.append(save_atomic(ds, folder / f"{style.name.upper()}_{z:03d}.dcm"))
    fsync_dir(folder)
    return OutputSeries(
        "map", analysis.kind.value, style.name, ident.series_uid, ident.series_number, ident.description,
        folder, tuple(paths), tuple(notes),
    )  # fmt: skip


def _image(
    reference: Dataset,
    analysis: PerfusionAnalysis,
    style: MapStyle,
    ident: SeriesIdentity,
    z: int,
    comment: str,
    source_series_uid: str,
    reference_is_source: bool,
) -> Dataset:
    ds = copy.deepcopy(reference)  # patient, study, equipment, geometry of this slice: already valid CT
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # whatever the reference's: pixels written here
    for keyword in DROPPED:
        if keyword in ds:
            del ds[keyword]
    equipment(ds)
    ds.SeriesInstanceUID = ident.series_uid
    ds.SeriesNumber = ident.series_number
    ds.SeriesDescription = ident.description
    ds.SOPInstanceUID = ident.instance_uid(z)
    ds.InstanceNumber = z + 1
    ds.AcquisitionNumber = 1
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL", style.title.upper()]
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope = DSfloat(style.slope, auto_format=True)
    ds.RescaleIntercept = "0"
    ds.RescaleType = "US"
    ds.add_new("PixelPaddingValue", "SS", PADDING)
    ds.WindowCenter = DSfloat((style.low + style.high) / 2, auto_format=True)
    ds.WindowWidth = DSfloat(style.high - style.low, auto_format=True)
    ds.WindowCenterWidthExplanation = f"{style.title} {style.low:g}-{style.high:g} {style.unit}"
    ds.RealWorldValueMappingSequence = DicomSequence([_real_world_value_mapping(style)])
    ds.ImageComments = comment
    ds.DerivationDescription = (
        f"{style.title} from CT perfusion analysis ({analysis.method or NODE_MANUFACTURER}) of the {analysis.label} "
        f"series; source series {source_series_uid}."
    )[:ST_MAX]
    if reference_is_source:  # an acquired map was not made from the reference images: named by UID only
        ds.SourceImageSequence = source_image(reference)
        ds.ReferencedSeriesSequence = referenced_series([reference])
    return ds


def _real_world_value_mapping(style: MapStyle) -> Dataset:
    item = Dataset()
    item.RealWorldValueFirstValueMapped = PADDING + 1
    item.RealWorldValueLastValueMapped = STORED_MAX
    item.RealWorldValueIntercept = 0.0
    item.RealWorldValueSlope = float(style.slope)
    item.LUTExplanation = f"{style.title} ({style.unit})"
    item.LUTLabel = style.title.upper()
    unit = Dataset()
    unit.CodeValue, unit.CodingSchemeDesignator, unit.CodeMeaning = style.ucum.value, "UCUM", style.ucum.meaning
    item.MeasurementUnitsCodeSequence = DicomSequence([unit])
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator = style.concept.value, style.concept.scheme_designator
    concept.CodeMeaning = style.concept.meaning
    quantity = Dataset()
    quantity.ValueType = "CODE"
    quantity.ConceptNameCodeSequence = DicomSequence([code_item("246205007", "SCT", "Quantity")])
    quantity.ConceptCodeSequence = DicomSequence([concept])
    item.QuantityDefinitionSequence = DicomSequence([quantity])
    return item
