"""Write the 1 s series as a derived DICOM series (pipeline stage ``write``), marked as docs/node.md asks.

One CT Image Storage instance per slice per second, written to ``out_dir`` (temporary name, fsync,
atomic rename), ready for C-STORE. What each instance says about itself:

- Identity: the source's StudyInstanceUID and FrameOfReferenceUID (same patient, same geometry), a
  new SeriesInstanceUID and new SOPInstanceUIDs. Every derived UID is a hash of the source
  SeriesInstanceUID and the recipe (model name, version, checkpoint, sampler, steps, generation),
  plus (second, slice) for instances: a re-run of the same recipe on the same series gives the same
  UIDs and so replaces its earlier result in a PACS; any change of recipe (or a bumped
  ``generation``) gives a new series, so different pixels never hide behind known UIDs.
- ImageType: ``DERIVED\\SECONDARY\\AXIAL`` for synthesised seconds (model output, and the long-gap
  linear fallback); ``DERIVED\\PRIMARY\\AXIAL`` for acquired seconds. Their pixels are the acquired
  pixels unchanged, i.e. a direct result of the examination (PRIMARY), but they are copies placed on
  a resampled time grid in a new series made by post-processing, so ORIGINAL would be untrue.
  ImageComments says per image whether it is SYNTHETIC, INTERPOLATED or ACQUIRED, its time, how
  its voxels were filled when the plan carries voxel counts ("model: N voxels, vessel fit: M voxels,
  linear: K voxels"), and the research-use caution.
- Time: image g is at ``source.start + time_s`` of its ``SecondFill`` (AcquisitionDate/Time and
  ContentDate/Time, to 1 us): the time of what it shows. An acquired image keeps its volume's own
  acquisition time (also when the model's grid snapped it to the nearest second); a synthetic or
  interpolated image sits at its true place between the two acquired volumes it was made from
  (``ctp_node.series.grid.from_model_grid``). With acquisitions on whole seconds these are the grid
  seconds, 1 s apart; with irregular ones they are not, and they always increase strictly. Where the
  source times its slices one by one (``CTPSeries.slice_times_s``: each slice of a volume a little
  after the previous), an acquired image carries its own source instance's time, and a synthetic or
  interpolated one its second's time plus that slice's lag, interpolated between its two volumes, so
  that the times still increase strictly at every slice position.
  TemporalPositionIdentifier g + 1 of NumberOfTemporalPositions T1; InstanceNumber ``g * Z + z + 1``;
  AcquisitionNumber g + 1. A source without a start time is refused (``DerivedSeriesError``): the
  writer does not invent absolute times.
- References: SourceImageSequence lists, per slice, the source instance(s) the image was made from
  (the acquired volume for acquired seconds; the two bracketing acquired volumes otherwise), with
  purpose "Source image for image processing operation"; for multi-frame sources the reference is
  the whole instance of that volume (frame numbers are not kept by the assembler).
  ReferencedSeriesSequence names the source series and the same instances.
- Equipment: Manufacturer "ctp-node", SoftwareVersions the node's version; one
  ContributingEquipmentSequence item (purpose "Processing Equipment") names the model, its version
  and checkpoint; DerivationDescription states the sampler, steps, and which seconds are synthetic.
- SeriesDescription: the recipe's text (must contain "SYNTHETIC", at most 64 characters);
  SeriesNumber: the source's plus ``series_number_offset`` (the offset alone if the source has none).
- Patient, study, clinical-trial attributes and the character set are copied unchanged from one
  source instance (the series' header template ``CTPSeries.header``, read once by the assembler;
  else ``source_files[0]``): nothing about the patient is altered. Type 2 attributes the
  source lacks (``TYPE2_KEYWORDS``; Laterality for a paired body part) are written empty, as the
  CT Image IOD requires, rather than left out.
- Padding: PixelPaddingValue (and PixelPaddingRangeLimit) are carried over, so that viewers keep
  treating the area outside the reconstruction circle as padding; a voxel that is padding in every
  source volume a second is made from keeps a padding value in that second, whatever the model or
  the interpolation gave it.
- Pixels: signed 16-bit, with the source's RescaleSlope/RescaleIntercept (slope 1, intercept 0
  when the source states none, as the assembler read it): stored = round((HU - intercept) / slope),
  i.e. HU rounded to integers for the usual slope 1. Values beyond the signed 16-bit range are
  clipped to it, and the number clipped is returned and logged (it cannot happen for values the
  pipeline produces: the model's 0..80 HU and interpolations of source values). NaN is refused.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pydicom.valuerep import DSfloat

from ctp_node.errors import DerivedSeriesError
from ctp_node.files import atomic_write, fsync_dir
from ctp_node.permissions import make_dirs
from ctp_node.series import CTPSeries
from ctp_node.series.dicom_attributes import StudyUIDs, dicom_date, dicom_time, pixel_format
from ctp_node.series.node_dicom import (
    CAUTION,
    LO_MAX,
    NODE_MANUFACTURER,
    ST_MAX,
    equipment,
    processing_equipment_purpose,
    source_image_purpose,
)
from model.planner import FillCounts, FillPlan, SecondFill

log = logging.getLogger(__name__)

DEFAULT_SERIES_DESCRIPTION = "CTP 1s SYNTHETIC - RESEARCH USE ONLY, NOT FOR DIAGNOSTIC USE"
IMAGE_TYPE_SYNTHETIC = ["DERIVED", "SECONDARY", "AXIAL"]
IMAGE_TYPE_ACQUIRED = ["DERIVED", "PRIMARY", "AXIAL"]
STORED_RANGE = (-32768, 32767)  # signed 16-bit pixels
GRID_STEP_TOLERANCE_S = 1e-6

# Copied from the source header as they are: the same patient, study and trial.
PATIENT_STUDY_KEYWORDS = (
    "SpecificCharacterSet",
    "TimezoneOffsetFromUTC",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID",
    "OtherPatientIDsSequence",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "EthnicGroup",
    "PatientComments",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "QualityControlSubject",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "PhysiciansOfRecord",
    "ProcedureCodeSequence",
    "AdmittingDiagnosesDescription",
    "ClinicalTrialSponsorName",
    "ClinicalTrialProtocolID",
    "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID",
    "ClinicalTrialSiteName",
    "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID",
    "ClinicalTrialTimePointID",
    "ClinicalTrialTimePointDescription",
)
# Copied because they stay true of the derived images: same position, contrast, acquisition and display.
ACQUISITION_KEYWORDS = (
    "BodyPartExamined",
    "PatientPosition",
    "PositionReferenceIndicator",
    "ContrastBolusAgent",
    "ContrastBolusRoute",
    "KVP",
    "SliceThickness",
    "WindowCenter",
    "WindowWidth",
    "LossyImageCompression",
    "LossyImageCompressionRatio",
    "LossyImageCompressionMethod",
    "Laterality",
)
# Type 2 in the CT Image IOD (Patient, General Study modules): present, empty when unknown.
TYPE2_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
# Body parts that are paired structures: Laterality (General Series, Type 2C) is then required.
PAIRED_BODY_PARTS = frozenset(
    {"BREAST", "EYE", "EAR", "KIDNEY", "LUNG", "ADRENAL", "OVARY", "TESTIS", "CLAVICLE", "SCAPULA", "SHOULDER",
     "ELBOW", "WRIST", "HAND", "HIP", "KNEE", "ANKLE", "FOOT", "ARM", "LEG", "UPRLIMB", "LOWRLIMB", "EXTREMITY",
     "FEMUR", "HUMERUS", "TIBIA", "FIBULA", "RADIUS", "ULNA", "THUMB", "FINGER", "TOE", "ORBIT", "PAROTID"}
)  # fmt: skip


@dataclass(frozen=True)
class DerivedRecipe:
    """How the 1 s series was made: named in the images, and part of every derived UID.

    ``generation``: bump it to publish a new series for an unchanged recipe (e.g. after a fix in the
    node). ``series_description``: at most 64 characters and must contain "SYNTHETIC".
    """

    model_name: str
    model_version: str
    checkpoint_id: str
    sampler: str
    steps: int
    generation: int = 1
    series_number_offset: int = 1000
    series_description: str = DEFAULT_SERIES_DESCRIPTION
    # A note on the whole series (the guardrail's flag or fallback), added to every image's
    # ImageComments; part of the derived UIDs, so a flagged or replaced result is its own series.
    comment: str = ""
    interpolation_reason: str = "gap longer than the model's"

    def __post_init__(self) -> None:
        problems = []
        for name in ("model_name", "model_version", "checkpoint_id", "sampler"):
            value = getattr(self, name)
            if not value or len(value) > LO_MAX or "\\" in value:
                problems.append(f"{name} must be 1..{LO_MAX} characters without a backslash, got {value!r}")
        if "SYNTHETIC" not in self.series_description:
            problems.append(f"series_description must contain 'SYNTHETIC', got {self.series_description!r}")
        if len(self.series_description) > LO_MAX or "\\" in self.series_description:
            problems.append(
                f"series_description must be at most {LO_MAX} characters without a backslash "
                f"({len(self.series_description)} given)"
            )
        if not isinstance(self.steps, int) or self.steps < 1:
            problems.append(f"steps must be a positive integer, got {self.steps!r}")
        if not isinstance(self.generation, int) or self.generation < 0:
            problems.append(f"generation must be an integer >= 0, got {self.generation!r}")
        if not isinstance(self.series_number_offset, int) or self.series_number_offset < 0:
            problems.append(f"series_number_offset must be an integer >= 0, got {self.series_number_offset!r}")
        if problems:
            raise ValueError("invalid DerivedRecipe: " + "; ".join(problems))

    def uid_seed(self, source_series_uid: str) -> str:
        """What the derived UIDs are hashed from (see the module docstring)."""
        parts = ("ctp-node derived 1s", source_series_uid, self.model_name, self.model_version, self.checkpoint_id)
        extra = (self.comment,) if self.comment else ()
        return "|".join((*parts, self.sampler, str(self.steps), str(self.generation), *extra))


@dataclass(frozen=True)
class DerivedSeries:
    """What was written: the series' identity, its files (second-major, slice-minor), the seconds that
    were not acquired (synthesised by the model or interpolated), and how many voxels were clipped."""

    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    series_number: int
    paths: tuple[Path, ...]
    synthetic_seconds: tuple[float, ...]
    clipped_voxels: int

    @property
    def count(self) -> int:
        return len(self.paths)


def write_derived_series(
    hu_1s: np.ndarray,
    fill: FillPlan,
    source: CTPSeries,
    source_files: SequenceABC[Path],
    out_dir: Path,
    *,
    recipe: DerivedRecipe,
    volume_notes: Mapping[int, str] | None = None,
) -> DerivedSeries:
    """Write ``hu_1s`` float (T1, Z, Y, X) HU as the derived series into ``out_dir`` (rules: module docstring).

    ``fill``: the engine's record of what fills each second (``model.planner.FillPlan``, on the clock
    of ``source.times_s``), with the voxel counts of ``ctp_node.series.grid.from_model_grid`` when they
    are to be stated in ImageComments. ``source_files``: the source instances (one is read for the
    patient/study header only when ``source.header`` is None). ``volume_notes``: what happened to a
    source volume before inpainting (by its index: realigned by the motion stage, or why it was not
    used), stated in the ImageComments of the images it fills or that replace it. Everything is checked
    before the first file is written.
    """
    hu = np.asarray(hu_1s)
    grid_times = np.asarray(fill.times_s, dtype=np.float64)
    _check_inputs(hu, grid_times, source, source_files)
    sources = fill.fills
    if fill.input_second.shape != source.times_s.shape:
        raise DerivedSeriesError(
            f"the plan was made for {fill.input_second.size} volumes, the source has {source.times_s.size}: "
            "pass the engine's plan of this series"
        )
    if source.header is not None:
        header, header_path = source.header, Path(source_files[0]) if source_files else Path("<header template>")
    else:
        header_path = Path(source_files[0])
        header = pydicom.dcmread(header_path, stop_before_pixels=True)
    _check_header(header, source, header_path)
    slope, intercept = _rescale(header)
    if float(slope) == 0:
        raise DerivedSeriesError(f"{header_path} states RescaleSlope 0: its pixel values cannot be HU")

    uids = StudyUIDs.derived(recipe.uid_seed(source.series_uid), study=source.study_uid)
    series_number = int(header.get("SeriesNumber") or 0) + recipe.series_number_offset
    base = _base_dataset(header, source, recipe, uids, series_number, slope, intercept)
    padding = _padding(header)
    if padding is not None:
        base.add_new("PixelPaddingValue", "SS", padding[2])  # the derived pixels are signed
        if "PixelPaddingRangeLimit" in header:
            base.add_new("PixelPaddingRangeLimit", "SS", padding[1] if padding[2] == padding[0] else padding[0])
    context = _Context(
        source, header, uids, recipe, grid_times, _summary(recipe, grid_times, sources), dict(volume_notes or {})
    )

    make_dirs(out_dir)
    paths, clipped = [], 0
    padded_cache: dict[int, np.ndarray] = {}
    for g, src in enumerate(sources):
        stored, clipped_here = _stored(hu[g], slope, intercept)
        clipped += clipped_here
        if padding is not None:
            _keep_padding(stored, source, src, padding, slope, intercept, padded_cache)
        for z in range(hu.shape[1]):
            ds = copy.deepcopy(base)  # pydicom's shallow copies share elements: assigning would alter base
            _instance(ds, context, src, g, z, src.voxels)
            path = out_dir / f"CTP1S_{g:04d}_{z:03d}.dcm"
            _save_atomic(ds, stored[z], path)
            paths.append(path)
    fsync_dir(out_dir)
    if clipped:
        log.warning("%d voxels of the derived series were outside signed 16-bit pixels and were clipped", clipped)
    return DerivedSeries(
        series_uid=uids.series,
        study_uid=source.study_uid,
        frame_of_reference_uid=str(header.FrameOfReferenceUID),
        series_number=series_number,
        paths=tuple(paths),
        synthetic_seconds=tuple(float(t) for t, s in zip(grid_times, sources) if s.kind != "acquired"),
        clipped_voxels=clipped,
    )


def _check_inputs(
    hu: np.ndarray,
    grid_times: np.ndarray,
    source: CTPSeries,
    source_files: SequenceABC[Path],
) -> None:
    n_t, n_z, n_y, n_x = source.hu.shape
    if hu.ndim != 4 or hu.shape[1:] != (n_z, n_y, n_x):
        raise DerivedSeriesError(f"hu_1s has shape {hu.shape}; expected (T1, {n_z}, {n_y}, {n_x}) like the source")
    if not np.issubdtype(hu.dtype, np.floating) and not np.issubdtype(hu.dtype, np.integer):
        raise DerivedSeriesError(f"hu_1s must hold numbers (HU), got dtype {hu.dtype}")
    n_t1 = hu.shape[0]
    if grid_times.shape != (n_t1,):
        raise DerivedSeriesError(f"the plan has {grid_times.size} seconds but hu_1s {n_t1}: give one image per second")
    if not np.all(np.isfinite(hu)):
        raise DerivedSeriesError("hu_1s holds NaN or infinite values: the inpainting went wrong; nothing written")
    if source.start is None:
        raise DerivedSeriesError(
            "the source series has no start time, so the derived images' AcquisitionTime/ContentTime cannot "
            "be stated; nothing written (assemble the source from DICOM, which always gives one)"
        )
    if not source.series_uid or not source.study_uid:
        raise DerivedSeriesError("the source series lacks its Study/SeriesInstanceUID: the derived UIDs hang on them")
    if len(source.sop_instance_uids) != n_t or any(len(v) not in (1, n_z) for v in source.sop_instance_uids):
        raise DerivedSeriesError(
            "the source lacks per-volume SOPInstanceUIDs (one per slice, or one multi-frame instance per volume): "
            "SourceImageSequence cannot be written"
        )
    if not source_files and source.header is None:
        raise DerivedSeriesError("source_files is empty: one source instance is needed for the patient/study header")


def _check_header(header: Dataset, source: CTPSeries, path: Path) -> None:
    for keyword, expected in (("StudyInstanceUID", source.study_uid), ("SeriesInstanceUID", source.series_uid)):
        if str(header.get(keyword, "")) != expected:
            raise DerivedSeriesError(
                f"{path} has {keyword} {header.get(keyword, 'missing')}, the source series has {expected}: "
                "pass a file of the source series"
            )
    frame_of_reference = str(header.get("FrameOfReferenceUID", ""))
    if not frame_of_reference or frame_of_reference != (source.frame_of_reference_uid or frame_of_reference):
        raise DerivedSeriesError(
            f"{path} has FrameOfReferenceUID {frame_of_reference or 'missing'} (source: "
            f"{source.frame_of_reference_uid or 'missing'}): the derived images must share the source's"
        )


def _rescale(header: Dataset) -> tuple[str, str]:
    """(slope, intercept) as the source writes them: top level, else the Enhanced CT functional groups."""
    if "RescaleSlope" in header or "RescaleIntercept" in header:
        return str(header.get("RescaleSlope", "1")), str(header.get("RescaleIntercept", "0"))
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        if group in header and "PixelValueTransformationSequence" in header[group][0]:
            item = header[group][0].PixelValueTransformationSequence[0]
            return str(item.get("RescaleSlope", "1")), str(item.get("RescaleIntercept", "0"))
    return "1", "0"


def _padding(header: Dataset) -> tuple[int, int, int] | None:
    """(low, high, value) of the source's pixel padding in stored values, or None without padding.

    The derived images keep the source's rescale, so a stored padding value means the same there;
    only a value beyond signed 16 bits (an unsigned source) is clipped, as its pixels are."""
    value = header.get("PixelPaddingValue")
    if value is None or isinstance(value, bytes):  # absent, or an unresolved US/SS value
        return None
    limit = header.get("PixelPaddingRangeLimit")
    low, high = STORED_RANGE
    value = int(np.clip(int(value), low, high))
    other = value if limit is None or isinstance(limit, bytes) else int(np.clip(int(limit), low, high))
    return min(value, other), max(value, other), value


def _keep_padding(
    stored: np.ndarray,
    source: CTPSeries,
    src: SecondFill,
    padding: tuple[int, int, int],
    slope: str,
    intercept: str,
    cache: dict[int, np.ndarray],
) -> None:
    """Voxels that are padding in every source volume of this second stay padding (in place).

    ``cache``: the padding masks of source volumes already looked at (seconds go forward in time,
    so masks of volumes before ``src.left`` are dropped)."""
    low, high, value = padding
    for v in [v for v in cache if v < src.left]:
        del cache[v]
    padded = np.ones(stored.shape, dtype=bool)
    for v in src.volumes:
        if v not in cache:
            source_stored, _ = _stored(source.hu[v], slope, intercept)
            cache[v] = (source_stored >= low) & (source_stored <= high)
        padded &= cache[v]
    stored[padded & ((stored < low) | (stored > high))] = value


def _stored(hu: np.ndarray, slope: str, intercept: str) -> tuple[np.ndarray, int]:
    """Stored int16 values of one (Z, Y, X) volume and how many were clipped."""
    values = np.rint((hu.astype(np.float64) - float(intercept)) / float(slope))
    low, high = STORED_RANGE
    clipped = int(np.count_nonzero((values < low) | (values > high)))
    return np.clip(values, low, high).astype(np.int16), clipped


def _base_dataset(
    header: Dataset,
    source: CTPSeries,
    recipe: DerivedRecipe,
    uids: StudyUIDs,
    series_number: int,
    slope: str,
    intercept: str,
) -> Dataset:
    ds = Dataset()
    for keyword in PATIENT_STUDY_KEYWORDS + ACQUISITION_KEYWORDS:
        if keyword in header:
            ds[keyword] = copy.deepcopy(header[keyword])
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.SeriesInstanceUID = uids.series
    ds.SeriesNumber = series_number
    ds.SeriesDescription = recipe.series_description
    ds.SeriesDate = dicom_date(source.start)  # type: ignore[arg-type]
    ds.SeriesTime = dicom_time(source.start, 6)  # type: ignore[arg-type]  # the represented acquisition's start
    ds.FrameOfReferenceUID = header.FrameOfReferenceUID
    for keyword in TYPE2_KEYWORDS:
        ds.setdefault(keyword, None)
    if "Laterality" not in ds and str(header.get("BodyPartExamined", "")).upper() in PAIRED_BODY_PARTS:
        ds.Laterality = None
    ds.setdefault("PositionReferenceIndicator", "")
    ds.setdefault("KVP", None)
    ds.setdefault("PatientPosition", "")
    equipment(ds)
    ds.ContributingEquipmentSequence = Sequence([_contributing_equipment(recipe)])
    ds.BurnedInAnnotation = "NO"
    ds.setdefault("LossyImageCompression", "00")
    _, _, n_y, n_x = source.hu.shape
    pixel_format(ds, n_y, n_x, signed=True, bits_stored=16)
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = slope
    ds.RescaleType = "HU"
    dz, dy, dx = source.spacing_mm
    direction = np.asarray(source.direction, dtype=np.float64)
    ds.PixelSpacing = [_ds(dy), _ds(dx)]
    ds.ImageOrientationPatient = [_ds(v) for v in (*direction[:, 0], *direction[:, 1])]
    if "SliceThickness" not in ds or ds.SliceThickness in (None, ""):
        ds.SliceThickness = _ds(dz)
    return ds


def _contributing_equipment(recipe: DerivedRecipe) -> Dataset:
    item = Dataset()
    item.Manufacturer = NODE_MANUFACTURER
    item.ManufacturerModelName = recipe.model_name
    item.SoftwareVersions = [recipe.model_version, recipe.checkpoint_id]
    item.ContributionDescription = (
        f"Temporal inpainting by conditional diffusion model {recipe.model_name} {recipe.model_version}, "
        f"checkpoint {recipe.checkpoint_id}, sampler {recipe.sampler}, {recipe.steps} steps"
    )
    item.PurposeOfReferenceCodeSequence = Sequence([processing_equipment_purpose()])
    return item


@dataclass(frozen=True)
class _Context:
    """What every instance of one derived series draws on."""

    source: CTPSeries
    header: Dataset
    uids: StudyUIDs
    recipe: DerivedRecipe
    grid_times: np.ndarray
    summary: str
    volume_notes: dict[int, str]


def _instance(ds: Dataset, context: _Context, src: SecondFill, g: int, z: int, fill: FillCounts | None) -> None:
    """Set the attributes of the image of second ``g``, slice ``z`` (made from ``src``, filled as ``fill``)."""
    source, uids, grid_times, recipe = context.source, context.uids, context.grid_times, context.recipe
    n_z, n_t1 = source.hu.shape[1], grid_times.shape[0]
    moment = source.start + timedelta(seconds=_image_time_s(source, src, z))  # type: ignore[operator]
    ds.SOPInstanceUID = uids.instance(g, z)
    ds.InstanceNumber = g * n_z + z + 1
    ds.AcquisitionNumber = g + 1
    ds.TemporalPositionIdentifier = g + 1
    ds.NumberOfTemporalPositions = n_t1
    ds.ImageType = IMAGE_TYPE_ACQUIRED if src.kind == "acquired" else IMAGE_TYPE_SYNTHETIC
    for prefix in ("Acquisition", "Content"):
        setattr(ds, f"{prefix}Date", dicom_date(moment))
        setattr(ds, f"{prefix}Time", dicom_time(moment, 6))
    position = source.slice_position(z)
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.SliceLocation = _ds(float(np.dot(position, np.asarray(source.direction, dtype=np.float64)[:, 2])))
    t, t_left, t_right = _s(src.time_s), _s(source.times_s[src.left]), _s(source.times_s[src.right])
    if src.kind == "acquired" and src.left in context.volume_notes:  # the motion stage moved it
        what = f"ACQUIRED image at {t} s: the source volume acquired at {t_left} s, {context.volume_notes[src.left]}."
    elif src.kind == "acquired":
        what = f"ACQUIRED image at {t} s: pixels of the source volume acquired at {t_left} s, unchanged."
    elif src.kind == "synthetic":
        what = (
            f"SYNTHETIC image at {t} s: brain voxels within 0..80 HU inpainted by {recipe.model_name} "
            f"between the volumes acquired at {t_left} s and {t_right} s; other voxels interpolated in time."
        )
    else:
        what = f"INTERPOLATED image at {t} s: linear in time between the volumes at {t_left} s and {t_right} s."
    if fill is not None and src.kind != "acquired":
        if fill.vessel_fit:
            what = what[:-1] + " (contrast-filled vessels: gamma-variate bolus fit of the acquired samples)."
        what += f" Filled voxels: {fill.describe()}."
    if src.replaces is not None:
        replaced = _s(source.times_s[src.replaces])
        why = context.volume_notes.get(src.replaces, "marked unusable")
        what += f" It replaces the volume acquired at {replaced} s, not used: {why}."
    ds.ImageComments = f"{what} {CAUTION}"
    if recipe.comment:  # the guardrail's flag or fallback, on every image of the series
        ds.ImageComments = f"{ds.ImageComments} {recipe.comment}"
    ds.DerivationDescription = _fit(f"{context.summary} This image: {what}", ST_MAX)
    references = [_reference(context.header, source, v, z) for v in src.volumes]
    ds.SourceImageSequence = Sequence([_with_purpose(r, source_image_purpose()) for r in references])
    referenced_series = Dataset()
    referenced_series.SeriesInstanceUID = source.series_uid
    referenced_series.ReferencedInstanceSequence = Sequence([copy.deepcopy(r) for r in references])
    ds.ReferencedSeriesSequence = Sequence([referenced_series])


def _image_time_s(source: CTPSeries, src: SecondFill, z: int) -> float:
    """When the image of slice ``z`` shows, in seconds after ``source.start`` (module docstring, Time).

    Volume times alone put 7 of 8 acquired images of a scanner that staggers its slices by 0.04 s at
    their volume's first slice's time, up to 0.28 s off their own (issue 23)."""
    if source.slice_times_s is None:
        return float(src.time_s)
    own = np.asarray(source.slice_times_s, dtype=np.float64)[:, z]
    if src.kind == "acquired":
        return float(own[src.left])
    lag = own - source.times_s  # this slice after its volume's first one
    return float(src.time_s + (1.0 - src.weight) * lag[src.left] + src.weight * lag[src.right])


def _reference(header: Dataset, source: CTPSeries, volume: int, z: int) -> Dataset:
    uids = source.sop_instance_uids[volume]
    item = Dataset()
    item.ReferencedSOPClassUID = header.SOPClassUID
    item.ReferencedSOPInstanceUID = uids[z] if len(uids) == source.hu.shape[1] else uids[0]
    return item


def _with_purpose(reference: Dataset, code: Dataset) -> Dataset:
    item = copy.deepcopy(reference)
    item.PurposeOfReferenceCodeSequence = Sequence([code])
    return item


def _summary(recipe: DerivedRecipe, grid_times: np.ndarray, sources: SequenceABC[SecondFill]) -> str:
    synthetic = [float(t) for t, s in zip(grid_times, sources) if s.kind == "synthetic"]
    interpolated = [float(t) for t, s in zip(grid_times, sources) if s.kind == "interpolated"]
    text = (
        f"1 s CT perfusion series: {len(synthetic)} of {len(sources)} seconds synthesised by conditional "
        f"diffusion model {recipe.model_name} {recipe.model_version} (checkpoint {recipe.checkpoint_id}; "
        f"sampler {recipe.sampler}, {recipe.steps} steps), seconds {_ranges(synthetic)} from the first volume"
    )
    if interpolated:
        text += f"; seconds {_ranges(interpolated)} linearly interpolated ({recipe.interpolation_reason})"
    text += "; acquired seconds unchanged"
    if any(abs(s.time_s - t) > 1e-6 for t, s in zip(grid_times, sources)):
        text += " (acquisitions off whole seconds: each image is timed when what it shows was, see ImageComments)"
    return text + "."


def _s(seconds: float) -> str:
    """Seconds to 1 ms without trailing zeros: '4', '1.5', '10.667'."""
    return f"{float(seconds):.3f}".rstrip("0").rstrip(".")


def _ranges(seconds: list[float]) -> str:
    """'1-3, 5-7' for [1, 2, 3, 5, 6, 7] (whole-second grids); 'none' if empty."""
    if not seconds:
        return "none"
    runs: list[list[float]] = [[seconds[0], seconds[0]]]
    for t in seconds[1:]:
        if abs(t - runs[-1][1] - 1.0) < GRID_STEP_TOLERANCE_S:
            runs[-1][1] = t
        else:
            runs.append([t, t])
    return ", ".join(f"{a:g}" if a == b else f"{a:g}-{b:g}" for a, b in runs)


def _fit(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters with a visible ellipsis (long synthetic-second lists only)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _ds(value: float) -> DSfloat:
    return DSfloat(float(value), auto_format=True)


def _save_atomic(ds: Dataset, pixels: np.ndarray, path: Path) -> None:
    """Temporary name in the same folder, fsync, rename: a reader never sees a partial file."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    with atomic_write(path, sync_folder=False) as fh:  # the folder is fsync'd once, after the series
        ds.save_as(fh, enforce_file_format=True)
