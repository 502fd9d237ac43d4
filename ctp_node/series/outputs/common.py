"""What every perfusion output series shares: identity, patient/study header, research marking, saving.

- Identity: every UID is hashed from the job's source SeriesInstanceUID, the output's kind, the
  analysed series and the generation, like the derived series' UIDs (ctp_node/series/derived.py): a
  re-run replaces its earlier outputs in a PACS; a new generation is a new series.
- Patient and study: copied unchanged from the reference image (the derived 1 s series, itself a copy
  of the source's), with the same keyword list as the derived writer.
- Research marking: SeriesDescription starts with ``RUO`` and says "RESEARCH USE ONLY"; ImageComments
  (images), burned-in text (Secondary Capture) and the content (SR) state the caution.
- Files: temporary name, fsync, rename; modes 0640 (``ctp_node.permissions``), one folder per series.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.coding import Code

from ctp_node.errors import PerfusionOutputError
from ctp_node.files import atomic_write
from ctp_node.permissions import make_dirs
from ctp_node.series.dicom_attributes import derived_uid
from ctp_node.series.node_dicom import CAUTION, LO_MAX, source_image_purpose

RESEARCH_PREFIX = "RUO"
RESEARCH_NOTE = "RESEARCH USE ONLY - NOT FOR DIAGNOSIS"
# What the lesion masks and their volumes are (SR measurements and SEG segments name the same findings).
INFARCT = Code("55641003", "SCT", "Infarct")
ISCHEMIA = Code("52674009", "SCT", "Ischemia")


@dataclass(frozen=True)
class OutputSeries:
    """One written output series: what it is, where its files are, and what a reader should know."""

    kind: str  # "map", "colour_map", "sr", "seg", "qa_report"
    analysis: str  # an AnalysisKind's value ("synthetic", "acquired"), or "both" (the QA report)
    name: str  # e.g. "cbf"
    series_uid: str
    series_number: int
    series_description: str
    folder: Path
    paths: tuple[Path, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def count(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class SeriesIdentity:
    """UIDs, number and description of one output series."""

    series_uid: str
    series_number: int
    description: str
    seed: str

    def instance_uid(self, *parts: object) -> str:
        return derived_uid(self.seed, self.series_uid, *parts)


def identity(
    source_series_uid: str, generation: int, kind: str, analysis: str, name: str, number: int, text: str
) -> SeriesIdentity:
    """The identity of one output series; ``text`` (e.g. "CBF mL/100g/min synthetic 1s") is prefixed with the
    research marking and cut to 64 characters."""
    seed = "|".join(("ctp-node perfusion output", source_series_uid, kind, analysis, name, str(generation)))
    description = f"{RESEARCH_PREFIX} {text} - RESEARCH USE ONLY"[:LO_MAX]
    return SeriesIdentity(derived_uid(seed, "series"), number, description, seed)


def tracking_uid(source_series_uid: str, generation: int, analysis_label: str, region: str) -> str:
    """The same UID for one region (e.g. the core) of one analysis in the SEG and in the SR."""
    return derived_uid("ctp-node perfusion tracking", source_series_uid, generation, analysis_label, region)


def read_references(files: Sequence[Path], shape_zyx: tuple[int, int, int], pixels: bool = False) -> list[Dataset]:
    """The reference images, one per slice, checked against the maps' grid."""
    n_z, n_y, n_x = shape_zyx
    if len(files) != n_z:
        raise PerfusionOutputError(
            f"{len(files)} reference images for maps of {n_z} slices: give one image per slice "
            "(the derived series' first second, DerivedSeries.paths[:Z])"
        )
    headers = []
    for path in files:
        ds = pydicom.dcmread(Path(path), stop_before_pixels=not pixels)
        if "NumberOfFrames" in ds and int(ds.NumberOfFrames) > 1:
            raise PerfusionOutputError(f"{path} is multi-frame: give single-frame images (the derived series')")
        if (int(ds.Rows), int(ds.Columns)) != (n_y, n_x):
            raise PerfusionOutputError(f"{path} is {ds.Rows} x {ds.Columns}; the maps are {n_y} x {n_x}")
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "FrameOfReferenceUID"):
            if keyword not in ds:
                raise PerfusionOutputError(f"{path} lacks {keyword}: the outputs need the images' geometry")
        headers.append(ds)
    if len({str(h.StudyInstanceUID) for h in headers}) != 1 or len({str(h.SeriesInstanceUID) for h in headers}) != 1:
        raise PerfusionOutputError("the reference images are not all of one series: give one series' images")
    orientation = np.asarray(headers[0].ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(orientation[:3], orientation[3:])
    along = np.array([np.dot(np.asarray(h.ImagePositionPatient, dtype=np.float64), normal) for h in headers])
    if n_z > 1 and not np.all(np.diff(along) > 0):
        raise PerfusionOutputError(
            "the reference images are not one image per slice in increasing slice order (positions along the "
            f"slice normal: {np.round(along, 2).tolist()}): give the first second's images, DerivedSeries.paths[:Z]"
        )
    return headers


def referenced_series(references: Sequence[Dataset]) -> DicomSequence:
    """ReferencedSeriesSequence naming the reference images."""
    item = Dataset()
    item.SeriesInstanceUID = references[0].SeriesInstanceUID
    instances = []
    for ref in references:
        instance = Dataset()
        instance.ReferencedSOPClassUID = ref.SOPClassUID
        instance.ReferencedSOPInstanceUID = ref.SOPInstanceUID
        instances.append(instance)
    item.ReferencedInstanceSequence = DicomSequence(instances)
    return DicomSequence([item])


def source_image(reference: Dataset) -> DicomSequence:
    """SourceImageSequence naming ``reference`` as the image the output was made from."""
    item = Dataset()
    item.ReferencedSOPClassUID = reference.SOPClassUID
    item.ReferencedSOPInstanceUID = reference.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = DicomSequence([source_image_purpose()])
    return DicomSequence([item])


def caution(text: str) -> str:
    """``text`` with the node's research-use caution (ImageComments)."""
    return f"{text} {CAUTION}".strip()


def save_atomic(ds: Dataset, path: Path) -> Path:
    """Temporary name in the same folder, fsync, rename: a reader (the send stage) never sees a partial file."""
    if not getattr(ds, "file_meta", None) or "TransferSyntaxUID" not in ds.file_meta:
        from pydicom.uid import ExplicitVRLittleEndian

        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    with atomic_write(path, sync_folder=False) as fh:  # the caller fsyncs the folder once per series
        ds.save_as(fh, enforce_file_format=True)
    return path


def series_folder(out_dir: Path, name: str) -> Path:
    """A fresh folder for one output series (earlier files of a re-run removed: same UIDs, same names)."""
    folder = out_dir / name
    make_dirs(folder)
    for old in folder.glob("*.dcm"):
        old.unlink()
    return folder
