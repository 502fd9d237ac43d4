"""The lesion masks as one binary DICOM Segmentation (highdicom), referencing the reference images.

Segments: 1 core (rCBF < 30 %), 2 Tmax > 6 s, 3 Tmax > 10 s. Slices where a segment is empty are
left out (``omit_empty_frames``), except when every mask is empty: then all frames are kept, so
that the SEG still states "no lesion" on every slice rather than failing to exist.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from ctp_node import __version__
from ctp_node.files import fsync_dir
from ctp_node.series.node_dicom import LO_MAX, NODE_MANUFACTURER
from ctp_node.series.outputs.common import (
    INFARCT,
    ISCHEMIA,
    OutputSeries,
    SeriesIdentity,
    save_atomic,
    series_folder,
)
from ctp_node.series.outputs.inputs import PerfusionAnalysis

MORPHOLOGICALLY_ALTERED = Code("49755003", "SCT", "Morphologically Altered Structure")
# (mask name, label, property type, description)
SEGMENTS = (
    ("core", "Core rCBF<30%", INFARCT, "ischaemic core: relative CBF below 30 % of normal tissue"),
    ("tmax6", "Tmax>6s", ISCHEMIA, "hypoperfusion: Tmax above 6 s"),
    ("tmax10", "Tmax>10s", ISCHEMIA, "severe hypoperfusion: Tmax above 10 s"),
)


def algorithm(analysis: PerfusionAnalysis) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name="ctp-node perfusion",
        version=__version__,
        family=codes.cid7162.MorphologicalOperations,  # map thresholds cleaned by majority vote and clusters
        parameters={"analysed series": analysis.label, "method": analysis.method or "default"},
    )


def shown_segments(analysis: PerfusionAnalysis) -> tuple[tuple, ...]:
    """The segments the SEG carries: a mask whose volume the analysis withholds is left out (drawn in
    PACS it would say what its withheld number would have said)."""
    return tuple(segment for segment in SEGMENTS if segment[0] not in analysis.withheld)


def segment_descriptions(
    analysis: PerfusionAnalysis, tracking: Callable[[str], str]
) -> list[hd.seg.SegmentDescription]:
    return [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=MORPHOLOGICALLY_ALTERED,
            segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm(analysis),
            tracking_id=label,
            tracking_uid=tracking(label),
        )
        for number, (_, label, kind, _) in enumerate(shown_segments(analysis), start=1)
    ]


def write_segmentation(
    analysis: PerfusionAnalysis,
    references: list[Dataset],
    ident: SeriesIdentity,
    out_dir: Path,
    tracking: Callable[[str], str],
) -> OutputSeries | None:
    """The three masks of ``analysis`` as one SEG instance into ``out_dir/<folder>``; ``tracking(label)``: the
    segment's tracking UID (the SR's measurement groups of the same region carry the same). Masks whose
    volumes the analysis withholds are left out; None (nothing written) when all three are."""
    segments = shown_segments(analysis)
    if not segments:
        return None
    masks = np.stack([np.asarray(analysis.mask(name), dtype=bool) for name, *_ in segments], axis=-1)  # (Z,Y,X,S)
    empty = [label for (name, label, *_), any_ in zip(segments, masks.any(axis=(0, 1, 2))) if not any_]
    seg = hd.seg.Segmentation(
        source_images=references,
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(analysis, tracking),
        series_instance_uid=ident.series_uid,
        series_number=ident.series_number,
        sop_instance_uid=ident.instance_uid("seg"),
        instance_number=1,
        manufacturer=NODE_MANUFACTURER,
        manufacturer_model_name=NODE_MANUFACTURER,
        software_versions=__version__,
        device_serial_number="0",
        content_label="PERFUSION",
        content_description=f"Lesion masks of the {analysis.label} series - RESEARCH USE ONLY"[:LO_MAX],
        omit_empty_frames=bool(masks.any()),
    )
    seg.SeriesDescription = ident.description
    folder = series_folder(out_dir, f"{analysis.kind.value}_seg")
    path = save_atomic(seg, folder / "SEG.dcm")
    fsync_dir(folder)
    notes = (f"empty segments: {', '.join(empty)}",) if empty else ()
    left_out = [label for name, label, *_ in SEGMENTS if name in analysis.withheld]
    if left_out:
        notes += (f"left out (volume withheld): {', '.join(left_out)}",)
    return OutputSeries(
        "seg", analysis.kind.value, "lesions", ident.series_uid, ident.series_number, ident.description,
        folder, (path,), notes,
    )  # fmt: skip
