"""`assemble_series`: DICOM instances of one CT perfusion series -> a `CTPSeries`.

Rules (docs/ctp-data.md):

- Single-frame CT Image Storage: group instances by slice position, sort each group by time
  (AcquisitionDate/Time, else ContentDate/Time; AcquisitionNumber and InstanceNumber only break
  ties); the k-th member of every group forms volume k.
- Enhanced CT Image Storage: every frame is a slice with its own position and time
  (FrameAcquisitionDateTime, else the instance's AcquisitionDateTime or ContentDate/Time); when
  every frame carries a TemporalPositionIndex, frames are ordered by it (the number of volumes is the
  number of distinct values, never a stated maximum) and then by time.

Everything is checked, nothing repaired: one series, one grid, evenly spaced slices, complete
volumes that do not interleave in time, at least two time points, decodable pixels. Violations raise
the matching ``ctp_node.errors`` exception with a message that says what to do. What later stages
need from the headers is checked here too, before any pixel is read (``InvalidHeaderError``): an
image matrix within ``max_matrix``, readable acquisition dates and times, and the dates, times and
codes the outputs copy (``COPIED_VALUES``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ctp_node.errors import (
    IncompleteSeriesError,
    InvalidHeaderError,
    MixedGeometryError,
    MixedSeriesError,
    NotCTPError,
    UndecodableError,
)
from ctp_node.series import CTPSeries

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2.1"
POSITION_DECIMALS = 2  # slices closer than 0.01 mm are the same position
ORIENTATION_TOLERANCE = 1e-4
SPACING_TOLERANCE_MM = 0.01
# Rows and Columns at most (``[series] max_matrix``): CT images are 512 (sometimes 768 or 1024); a
# header claiming 65535 would otherwise be met by a 1 TiB allocation, retried as a transient fault.
DEFAULT_MAX_MATRIX = 1024
# Copied from the header into the derived series and every perfusion output, where highdicom parses
# them: a value that is not DICOM fails there, after the whole series was inpainted (issue 23).
COPIED_VALUES = (("StudyDate", "DA"), ("StudyTime", "TM"), ("PatientBirthDate", "DA"), ("PatientBirthTime", "TM"))
PATIENT_SEX = ("M", "F", "O")  # highdicom's PatientSexValues; empty is allowed (Type 2)


@dataclass(frozen=True)
class _Slice:
    """One 2D image: a single-frame instance, or one frame of a multi-frame instance."""

    path: Path
    frame: int  # 0 for single-frame instances
    sop_uid: str
    position: tuple[float, float, float]
    moment: datetime
    order: tuple  # sort key within a slice position
    slope: float
    intercept: float


@dataclass(frozen=True)
class _Grid:
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int


def assemble_series(
    paths: Iterable[str | Path],
    *,
    check_first_header: Callable[[Dataset], None] | None = None,
    max_matrix: int = DEFAULT_MAX_MATRIX,
) -> CTPSeries:
    """Read and check the instances in ``paths`` and return the 4D series in HU.

    ``check_first_header``: called with the first file's header before anything else is checked or
    any pixels are read (e.g. to refuse a series by its header early). That header is kept as the
    series' ``header`` template. ``max_matrix``: the largest Rows and Columns accepted. Raises a
    ``ctp_node.errors.CTPInputError`` subclass if the files are not one complete CTP series.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise NotCTPError("no files given: point to the folder holding the CTP series' DICOM files")
    first = _read_header(paths[0])
    if check_first_header is not None:
        check_first_header(first)
    headers = [first, *(_read_header(p) for p in paths[1:])]
    _check_one_series(headers, paths)
    grid = _check_one_grid(headers, paths, max_matrix)
    _check_copied_values(headers, paths)
    slices = [s for path, ds in zip(paths, headers, strict=True) for s in _slices(path, ds)]
    _check_unique(slices)
    normal = np.cross(grid.orientation[:3], grid.orientation[3:])
    positions, volumes = _volumes(slices, normal)
    backwards = _times_run_backwards(volumes)
    spacing_z = _slice_spacing(positions, normal)
    hu = _pixels(volumes, grid)
    start = min(s.moment for s in volumes[0])
    times = np.array([(min(s.moment for s in v) - start).total_seconds() for v in volumes])
    # Each slice's own time: the derived series gives an acquired image the time of its source instance.
    slice_times = np.array([[(s.moment - start).total_seconds() for s in v] for v in volumes])
    direction = np.column_stack([grid.orientation[:3], grid.orientation[3:], normal])
    return CTPSeries(
        hu=hu,
        times_s=times,
        origin=tuple(float(v) for v in positions[0]),
        spacing_mm=(spacing_z, grid.pixel_spacing[0], grid.pixel_spacing[1]),
        direction=direction,
        sop_instance_uids=[tuple(dict.fromkeys(s.sop_uid for s in v)) for v in volumes],
        study_uid=str(first.StudyInstanceUID),
        series_uid=str(first.SeriesInstanceUID),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
        start=start,
        header=first,
        slice_times_s=slice_times,
        warnings=(backwards,) if backwards else (),
    )


def _read_header(path: Path):
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises several types for damaged files
        raise UndecodableError(f"{path} is not a readable DICOM file ({exc}); remove it or resend the series") from exc


def _check_one_series(headers: list, paths: list[Path]) -> None:
    for path, ds in zip(paths, headers, strict=True):
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class not in (CT_IMAGE, ENHANCED_CT_IMAGE) or ds.get("Modality") != "CT":
            raise NotCTPError(
                f"{path} is not a CT image (SOP class {sop_class or 'missing'}, modality "
                f"{ds.get('Modality', 'missing')}): CTP needs CT Image or Enhanced CT Image Storage"
            )
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"):
        values = {str(ds.get(keyword, "")) for ds in headers}
        if len(values) > 1:
            raise MixedSeriesError(
                f"the files hold {len(values)} different {keyword} values ({', '.join(sorted(values))}); "
                "assemble one series at a time"
            )


def _check_one_grid(headers: list, paths: list[Path], max_matrix: int) -> _Grid:
    grids = {}
    for path, ds in zip(paths, headers, strict=True):
        orientation = _attribute(ds, "PlaneOrientationSequence", "ImageOrientationPatient", frame=0)
        spacing = _attribute(ds, "PixelMeasuresSequence", "PixelSpacing", frame=0)
        if orientation is None or spacing is None:
            raise MixedGeometryError(f"{path} lacks ImageOrientationPatient or PixelSpacing: no usable geometry")
        rows, columns = _matrix(ds, path, max_matrix)
        grid = _Grid(tuple(float(v) for v in orientation), tuple(float(v) for v in spacing), rows, columns)
        grids[path] = grid
    reference = next(iter(grids.values()))
    for path, grid in grids.items():
        same = (
            np.allclose(grid.orientation, reference.orientation, atol=ORIENTATION_TOLERANCE)
            and np.allclose(grid.pixel_spacing, reference.pixel_spacing, atol=1e-4)
            and (grid.rows, grid.columns) == (reference.rows, reference.columns)
        )
        if not same:
            raise MixedGeometryError(
                f"{path} has orientation {grid.orientation}, pixel spacing {grid.pixel_spacing}, matrix "
                f"{grid.rows}x{grid.columns}; {paths[0]} has {reference.orientation}, {reference.pixel_spacing}, "
                f"{reference.rows}x{reference.columns}: all images of a CTP series must share one grid"
            )
    return reference


def _matrix(ds, path: Path, max_matrix: int) -> tuple[int, int]:
    """(Rows, Columns), checked before the series' array is allocated from them."""
    try:
        rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    except (TypeError, ValueError):
        rows = columns = 0
    if rows < 1 or columns < 1:
        raise InvalidHeaderError(
            f"{path} states Rows {ds.get('Rows')!r}, Columns {ds.get('Columns')!r}: not an image matrix"
        )
    if rows > max_matrix or columns > max_matrix:
        raise InvalidHeaderError(
            f"{path} states a {rows}x{columns} matrix, beyond this node's [series] max_matrix {max_matrix}: "
            "the header is wrong, or the node must be configured for such images"
        )
    return rows, columns


def _check_copied_values(headers: list, paths: list[Path]) -> None:
    """The dates, times and codes the derived series and the perfusion outputs copy must be DICOM."""
    from pydicom.valuerep import DA, TM

    parsers = {"DA": DA, "TM": TM}
    for path, ds in zip(paths, headers, strict=True):
        for keyword, vr in COPIED_VALUES:
            value = ds.get(keyword)
            if value in (None, ""):  # Type 2: empty is allowed
                continue
            try:
                parsers[vr](value)
            except (TypeError, ValueError) as exc:
                raise InvalidHeaderError(
                    f"{path} states {keyword} {str(value)[:64]!r}, not a DICOM {vr} value ({exc}): "
                    "correct it at the scanner or PACS and resend the series"
                ) from exc
        sex = str(ds.get("PatientSex") or "").strip()
        if sex and sex not in PATIENT_SEX:
            raise InvalidHeaderError(
                f"{path} states PatientSex {sex[:64]!r}, not one of M, F, O or empty: "
                "correct it at the scanner or PACS and resend the series"
            )


def _attribute(ds, group: str, keyword: str, frame: int | None = None):
    """An attribute from the per-frame group, else the shared group, else the top level."""
    if frame is not None and "PerFrameFunctionalGroupsSequence" in ds:
        item = ds.PerFrameFunctionalGroupsSequence[frame]
        if group in item and keyword in item[group][0]:
            return item[group][0][keyword].value
    if "SharedFunctionalGroupsSequence" in ds:
        item = ds.SharedFunctionalGroupsSequence[0]
        if group in item and keyword in item[group][0]:
            return item[group][0][keyword].value
    return ds.get(keyword)


def _slices(path: Path, ds) -> list[_Slice]:
    if str(ds.SOPClassUID) == ENHANCED_CT_IMAGE:
        return _enhanced_slices(path, ds)
    position = ds.get("ImagePositionPatient")
    if position is None:
        raise MixedGeometryError(f"{path} lacks ImagePositionPatient: cannot place the slice")
    moment = _instance_moment(ds)
    if moment is None:
        raise NotCTPError(
            f"{path} has neither AcquisitionTime nor ContentTime: the time of its volume is unknown, "
            "so it cannot be part of a perfusion series"
        )
    acquisition = ds.get("AcquisitionNumber")
    order = (moment, int(acquisition) if acquisition not in (None, "") else 0, int(ds.get("InstanceNumber") or 0))
    return [
        _Slice(
            path,
            0,
            str(ds.SOPInstanceUID),
            tuple(float(v) for v in position),
            moment,
            order,
            float(ds.get("RescaleSlope", 1.0)),
            float(ds.get("RescaleIntercept", 0.0)),
        )
    ]


def _enhanced_slices(path: Path, ds) -> list[_Slice]:
    frames = int(ds.get("NumberOfFrames", 1))
    fallback = _parse_dt(ds.get("AcquisitionDateTime")) or _instance_moment(ds)
    slices = []
    for frame in range(frames):
        position = _attribute(ds, "PlanePositionSequence", "ImagePositionPatient", frame)
        if position is None:
            raise MixedGeometryError(f"{path} frame {frame + 1} lacks a Plane Position: cannot place it")
        moment = _parse_dt(_attribute(ds, "FrameContentSequence", "FrameAcquisitionDateTime", frame)) or fallback
        if moment is None:
            raise NotCTPError(
                f"{path} frame {frame + 1} has no FrameAcquisitionDateTime and the instance no acquisition "
                "or content time: the time of its volume is unknown"
            )
        index = _attribute(ds, "FrameContentSequence", "TemporalPositionIndex", frame)
        slices.append(
            _Slice(
                path,
                frame,
                str(ds.SOPInstanceUID),
                tuple(float(v) for v in position),
                moment,
                (int(index) if index is not None else -1, moment),
                float(_attribute(ds, "PixelValueTransformationSequence", "RescaleSlope", frame) or 1.0),
                float(_attribute(ds, "PixelValueTransformationSequence", "RescaleIntercept", frame) or 0.0),
            )
        )
    has_index = {s.order[0] >= 0 for s in slices}
    if len(has_index) > 1:
        raise MixedSeriesError(f"{path}: only some frames carry a TemporalPositionIndex; cannot order its frames")
    return slices


def _instance_moment(ds) -> datetime | None:
    for prefix in ("Acquisition", "Content"):
        time = ds.get(f"{prefix}Time")
        if time:
            return _parse_da_tm(ds.get(f"{prefix}Date") or ds.get("StudyDate") or "19000101", str(time))
    return None


def _parse_da_tm(date: str, time: str) -> datetime:
    text = str(time).strip().replace(":", "")
    whole, _, fraction = text.partition(".")
    whole = whole.ljust(6, "0")
    try:
        return datetime.strptime(f"{str(date).strip()[:8]}{whole}", "%Y%m%d%H%M%S").replace(
            microsecond=int(fraction.ljust(6, "0")[:6] or 0)
        )
    except ValueError as exc:  # a CT series with a broken header: failed with the reason, not ignored as not CTP
        raise InvalidHeaderError(
            f"unreadable date/time {date!r} {time!r} ({exc}): the acquisition times are unusable"
        ) from exc


def _parse_dt(value) -> datetime | None:
    if not value:
        return None
    text = str(value).strip()
    for sign in ("+", "-"):  # drop a UTC offset: all times of one series share it
        if sign in text[8:]:
            text = text[: 8 + text[8:].index(sign)]
    return _parse_da_tm(text[:8], text[8:] or "000000")


def _check_unique(slices: list[_Slice]) -> None:
    seen: dict[tuple[str, int], Path] = {}
    for s in slices:
        key = (s.sop_uid, s.frame)
        if key in seen and seen[key] != s.path:
            raise MixedSeriesError(
                f"SOPInstanceUID {s.sop_uid} appears in {seen[key]} and {s.path}: remove the duplicate file"
            )
        seen[key] = s.path


def _volumes(slices: list[_Slice], normal: np.ndarray) -> tuple[list[np.ndarray], list[list[_Slice]]]:
    """Slice positions (sorted along the normal) and the slices of each volume in that order."""
    groups: dict[tuple[float, ...], list[_Slice]] = defaultdict(list)
    for s in slices:
        groups[tuple(np.round(s.position, POSITION_DECIMALS))].append(s)
    keys = sorted(groups, key=lambda k: float(np.dot(k, normal)))
    _check_positions_kept(groups, keys)
    counts = {k: len(groups[k]) for k in keys}
    expected = max(counts.values())
    short = {k: n for k, n in counts.items() if n != expected}
    if short:
        listed = ", ".join(f"{_mm(k)} has {n}" for k, n in list(short.items())[:5])
        raise IncompleteSeriesError(
            f"{len(short)} of {len(keys)} slice positions lack instances ({listed}; the others have "
            f"{expected}): some volume is incomplete; wait until the series has arrived or resend it"
        )
    if expected < 2:
        raise NotCTPError(
            f"only one time point ({len(keys)} slices, one per position): a perfusion series needs several "
            "volumes over time; check that the whole series was sent"
        )
    for k in keys:
        groups[k].sort(key=lambda s: s.order)
    volumes = [[groups[k][t] for k in keys] for t in range(expected)]
    _check_index_agrees_with_time(volumes)
    for t in range(expected - 1):
        if max(s.moment for s in volumes[t]) >= min(s.moment for s in volumes[t + 1]):
            raise MixedSeriesError(
                f"volumes {t + 1} and {t + 2} overlap in time (or share a time): the slices cannot be grouped "
                "into volumes; the input may mix two acquisitions or repeat instances"
            )
    for t, volume in enumerate(volumes):
        indices = {s.order[0] for s in volume if isinstance(s.order[0], int)}
        if len(indices) > 1:
            raise MixedSeriesError(
                f"volume {t + 1} mixes TemporalPositionIndex values {sorted(indices)}: some time point lacks frames"
            )
    return [np.asarray(groups[k][0].position, dtype=np.float64) for k in keys], volumes


def _times_run_backwards(volumes: list[list[_Slice]]) -> str | None:
    """Single-frame volumes are ordered by their acquisition times (the numbers only break ties). Where
    the numbers (AcquisitionNumber, then InstanceNumber) of a slice position fall from one volume to
    the next, the times run backwards against them: the series is still usable in the order of its
    times, which is when the images were acquired, but the job says so (issue 23: it ended "done"
    without a word). Equal numbers (a scanner that numbers each volume from 1) say nothing."""
    if not volumes or not volumes[0] or isinstance(volumes[0][0].order[0], int):  # Enhanced CT: by index
        return None
    steps = len(volumes) - 1
    pairs = [zip(volumes[t], volumes[t + 1], strict=True) for t in range(steps)]
    falling = [t for t, pair in enumerate(pairs) if any(b.order[1:] < a.order[1:] for a, b in pair)]
    if not falling:
        return None
    first = falling[0]
    return (
        f"acquisition times run backwards against the instance numbers at {len(falling)} of {steps} steps between "
        f"volumes (volume {first + 2}, acquired after volume {first + 1}, is numbered before it): the volumes are in "
        "the order of their acquisition times; check the scanner's clock and the series"
    )


def _check_index_agrees_with_time(volumes: list[list[_Slice]]) -> None:
    """Enhanced CT frames are ordered by TemporalPositionIndex, the order the scanner states. Times
    that fall as the index rises contradict it, and which of the two is wrong cannot be told."""
    if len(volumes) < 2 or not isinstance(volumes[0][0].order[0], int) or volumes[0][0].order[0] < 0:
        return
    starts = [min(s.moment for s in volume) for volume in volumes]
    falling = [t for t in range(len(volumes) - 1) if starts[t + 1] < starts[t]]
    if falling:
        t = falling[0]
        raise MixedSeriesError(
            f"acquisition times run backwards against TemporalPositionIndex at {len(falling)} of {len(volumes) - 1} "
            f"steps (index {volumes[t + 1][0].order[0]} was acquired at {starts[t + 1]:%H:%M:%S.%f}, before index "
            f"{volumes[t][0].order[0]} at {starts[t]:%H:%M:%S.%f}): the frames' order cannot be recovered; check the "
            "scanner's clock and the series"
        )


def _check_positions_kept(groups: dict[tuple[float, ...], list[_Slice]], keys: list) -> None:
    """Every slice position is imaged from the first volume to the last. Slices at some positions that
    all end before others begin mean the geometry moved during the series; grouping them by position
    would mix them into volumes, refused with a misleading "overlap in time" (issue 23). Positions with a
    single instance are left to the completeness check (a stray or missing instance)."""
    repeated = [k for k in keys if len(groups[k]) > 1]
    if not repeated:
        return
    first = {k: min(s.moment for s in groups[k]) for k in repeated}
    last = {k: max(s.moment for s in groups[k]) for k in repeated}
    early = min(repeated, key=lambda k: last[k])
    late = max(repeated, key=lambda k: first[k])
    if last[early] < first[late]:
        raise MixedGeometryError(
            f"slice positions change during the series: {_mm(early)} is imaged only until {last[early]:%H:%M:%S.%f}, "
            f"{_mm(late)} only from {first[late]:%H:%M:%S.%f} on: the volumes do not share one set of slices "
            "(table or field of view moved between volumes); a CTP series needs the same slices in every volume"
        )


def _mm(position: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in position) + ") mm"


def _slice_spacing(positions: list[np.ndarray], normal: np.ndarray) -> float:
    if len(positions) == 1:
        raise NotCTPError("a single slice position: the phantom, perfusion and inpainting need a volume")
    offsets = np.array([p - positions[0] for p in positions])
    along = offsets @ normal
    in_plane = offsets - np.outer(along, normal)
    if np.abs(in_plane).max() > SPACING_TOLERANCE_MM * 10:
        raise MixedGeometryError(
            "slice positions do not lie on one line along the slice normal (gantry tilt or shifted slices)"
        )
    steps = np.diff(along)
    if np.ptp(steps) > SPACING_TOLERANCE_MM:
        raise MixedGeometryError(
            f"slices are not evenly spaced (steps {np.round(steps, 3).tolist()} mm): "
            "a CTP volume must be a regular stack"
        )
    return float(np.mean(steps))


def _pixels(volumes: list[list[_Slice]], grid: _Grid) -> np.ndarray:
    hu = np.empty((len(volumes), len(volumes[0]), grid.rows, grid.columns), dtype=np.float32)
    where: dict[Path, list[tuple[int, int, _Slice]]] = defaultdict(list)
    for t, volume in enumerate(volumes):
        for z, s in enumerate(volume):
            where[s.path].append((t, z, s))
    for path, targets in where.items():
        frames = _decode(path)
        if frames.ndim == 2:
            frames = frames[None]
        for t, z, s in targets:
            hu[t, z] = frames[s.frame].astype(np.float32) * np.float32(s.slope) + np.float32(s.intercept)
    return hu


def _decode(path: Path) -> np.ndarray:
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises several types for damaged files
        raise UndecodableError(f"{path} is not a readable DICOM file ({exc}); remove it or resend the series") from exc
    try:
        return ds.pixel_array
    except Exception as exc:  # decoders raise many types; all mean the same to the caller
        syntax = ds.file_meta.get("TransferSyntaxUID", "missing")
        raise UndecodableError(
            f"cannot decode the pixel data of {path} (transfer syntax {getattr(syntax, 'name', syntax)}): {exc}. "
            "The file may be truncated (resend it) or need a decoder plugin (pylibjpeg-libjpeg for JPEG Lossless)"
        ) from exc
