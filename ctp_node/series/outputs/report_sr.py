"""The lesion volumes as a DICOM Structured Report: TID 1500 Measurement Report (highdicom Comprehensive 3D SR).

One measurement group (TID 1501) per quantity, named by its tracking identifier:

- "Core rCBF<30%", "Tmax>6s", "Tmax>10s", "Mismatch": Volume (SCT 118565006) in mL (UCUM "ml"), by
  the sum of segmented voxels (DCM 126030); finding type core SCT 55641003 "Infarct", hypoperfusion
  SCT 52674009 "Ischemia";
- "Mismatch ratio" (Tmax > 6 s volume / core volume) and "Hypoperfusion intensity ratio" (Tmax > 10 s
  / Tmax > 6 s): Ratio (SCT 118586006), unitless (UCUM "{ratio}").

A quantity that is unknown (no voxel size, a ratio over an empty region) is left out and named in the
report's notes (``OutputSeries.notes``) rather than written as 0. A lesion volume the analysis
withholds (``ctp_node.perfusion.reliability``) keeps its group, with "Volume: Indeterminate"
(SCT 82334004) instead of a number, and the reason in the algorithm parameters. The caution is in SeriesDescription
and, for readers of the content, in the algorithm's parameters of every measurement group.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from ctp_node import __version__
from ctp_node.files import fsync_dir
from ctp_node.series.node_dicom import NODE_MANUFACTURER
from ctp_node.series.outputs.common import (
    INFARCT,
    ISCHEMIA,
    RESEARCH_NOTE,
    OutputSeries,
    SeriesIdentity,
    save_atomic,
    series_folder,
)
from ctp_node.series.outputs.inputs import PerfusionAnalysis

VOLUME = Code("118565006", "SCT", "Volume")
RATIO = Code("118586006", "SCT", "Ratio")
MILLILITRE = Code("ml", "UCUM", "milliliter")
UNITLESS = Code("{ratio}", "UCUM", "ratio")
SUM_OF_VOXELS = Code("126030", "DCM", "Sum of segmented voxel method for volume")
PROCEDURE = Code("126301", "DCM", "Perfusion analysis by IV Iodinated Contrast CT technique")


INDETERMINATE = Code("82334004", "SCT", "Indeterminate")


@dataclass(frozen=True)
class Quantity:
    tracking_id: str
    attribute: str  # PerfusionAnalysis field
    name: Code
    unit: Code
    finding: Code | None
    volume: str | None = None  # the lesion volume it is (PerfusionAnalysis.withheld keys)


QUANTITIES = (
    Quantity("Core rCBF<30%", "core_volume_ml", VOLUME, MILLILITRE, INFARCT, "core"),
    Quantity("Tmax>6s", "tmax6_volume_ml", VOLUME, MILLILITRE, ISCHEMIA, "tmax6"),
    Quantity("Tmax>10s", "tmax10_volume_ml", VOLUME, MILLILITRE, ISCHEMIA, "tmax10"),
    Quantity("Mismatch", "mismatch_volume_ml", VOLUME, MILLILITRE, ISCHEMIA),
    Quantity("Mismatch ratio", "mismatch_ratio", RATIO, UNITLESS, None),
    Quantity("Hypoperfusion intensity ratio", "hypoperfusion_intensity_ratio", RATIO, UNITLESS, None),
)


def measurement_groups(
    analysis: PerfusionAnalysis, tracking: Callable[[str], str]
) -> tuple[list[hd.sr.MeasurementsAndQualitativeEvaluations], list[str]]:
    """The groups of the known quantities and the names of the unknown ones.

    A withheld lesion volume gets a group without a measurement: its finding evaluated as
    "Indeterminate" (SCT 82334004), so a reader sees that it was looked for and not measured, not
    that it was forgotten; the reason travels in the algorithm parameters of every group."""
    withheld = [f"{name} volume withheld: {reason}"[:256] for name, reason in analysis.withheld.items()]
    algorithm = hd.sr.AlgorithmIdentification(
        name="ctp-node perfusion",
        version=__version__,
        parameters=[f"analysed series: {analysis.label}", RESEARCH_NOTE, *withheld],
    )
    groups, unknown = [], []
    for quantity in QUANTITIES:
        value = getattr(analysis, quantity.attribute)
        tracking_id = hd.sr.TrackingIdentifier(uid=tracking(quantity.tracking_id), identifier=quantity.tracking_id)
        if quantity.volume is not None and quantity.volume in analysis.withheld:
            unknown.append(quantity.tracking_id)
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking_id,
                    finding_type=quantity.finding,
                    algorithm_id=algorithm,
                    qualitative_evaluations=[hd.sr.QualitativeEvaluation(VOLUME, INDETERMINATE)],
                )
            )
            continue
        if value is None or not math.isfinite(float(value)):
            unknown.append(quantity.tracking_id)
            continue
        noise = analysis.noise.get(quantity.volume) if quantity.volume is not None else None
        properties = None
        if noise is not None:
            # TID 310's measurement uncertainty: the range the study's own noise gives this volume (the
            # analysis' noise-injected replicates, 95 %), as distances below and above the value.
            properties = hd.sr.MeasurementProperties(
                upper_measurement_uncertainty=round(max(noise.high_ml - float(value), 0.0), 3),
                lower_measurement_uncertainty=round(max(float(value) - noise.low_ml, 0.0), 3),
            )
        measurement = hd.sr.Measurement(
            name=quantity.name,
            value=round(float(value), 3),
            unit=quantity.unit,
            method=SUM_OF_VOXELS if quantity.unit == MILLILITRE else None,
            algorithm_id=algorithm,
            properties=properties,
        )
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking_id,
                finding_type=quantity.finding,
                algorithm_id=algorithm,
                measurements=[measurement],
            )
        )
    return groups, unknown


def write_structured_report(
    analysis: PerfusionAnalysis,
    references: list[Dataset],
    ident: SeriesIdentity,
    out_dir: Path,
    tracking: Callable[[str], str],
) -> OutputSeries:
    """The volumes of ``analysis`` as one Comprehensive 3D SR instance into ``out_dir/<folder>``;
    ``tracking(label)``: the tracking UID of a region (the SEG's segment of the same region has the same)."""
    groups, unknown = measurement_groups(analysis, tracking)
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=ident.instance_uid("device"),
            name=NODE_MANUFACTURER,
            manufacturer_name=NODE_MANUFACTURER,
            model_name=NODE_MANUFACTURER,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE,
        imaging_measurements=groups,
        referenced_images=references,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=references,
        content=report[0],
        series_instance_uid=ident.series_uid,
        series_number=ident.series_number,
        sop_instance_uid=ident.instance_uid("sr"),
        instance_number=1,
        manufacturer=NODE_MANUFACTURER,
        is_complete=True,
    )
    sr.SeriesDescription = ident.description
    sr.ManufacturerModelName = NODE_MANUFACTURER
    sr.SoftwareVersions = __version__
    folder = series_folder(out_dir, f"{analysis.kind.value}_sr")
    path = save_atomic(sr, folder / "SR.dcm")
    fsync_dir(folder)
    notes = (f"not reported (unknown, undefined or withheld): {', '.join(unknown)}",) if unknown else ()
    return OutputSeries(
        "sr", analysis.kind.value, "volumes", ident.series_uid, ident.series_number, ident.description,
        folder, (path,), notes,
    )  # fmt: skip
