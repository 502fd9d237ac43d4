"""Enhanced CT Image Storage: one multi-frame instance per time point.

Per frame: Frame Content (FrameAcquisitionDateTime, TemporalPositionIndex, StackID,
InStackPositionNumber, DimensionIndexValues), Plane Position and CT Position. Shared: pixel
measures, plane orientation, CT frame type/acquisition/reconstruction/exposure/X-ray details, pixel
value transformation (HU), VOI LUT, anatomy, irradiation event. The dimension organisation indexes
frames by (stack, position in stack, temporal position). Contrast/bolus modules are omitted.
"""

from __future__ import annotations

import copy
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import EnhancedCTImageStorage

from ctp_node.phantom.dicom_modules import (
    KVP,
    RESCALE_INTERCEPT,
    RESCALE_SLOPE,
    base_dataset,
    ds_string,
    item,
    save_instance,
    stored_values,
    volume_times,
)
from ctp_node.phantom.dicom_profiles import VendorProfile
from ctp_node.series import CTPSeries
from ctp_node.series.dicom_attributes import StudyUIDs, dicom_date, dicom_datetime, dicom_time

if TYPE_CHECKING:  # the type only: model's package would load torch
    from model.progress import ProgressFn


def write_enhanced(
    series: CTPSeries,
    out_dir: Path,
    profile: VendorProfile,
    uids: StudyUIDs,
    syntax: str,
    progress: ProgressFn,
) -> list[Path]:
    """Write T multi-frame instances named EN_<volume>.dcm; ``syntax`` is Explicit VR LE or RLE."""
    n_t, n_z = series.hu.shape[:2]
    base = base_dataset(series, uids, profile, EnhancedCTImageStorage, "enhanced")
    times = volume_times(series)
    base.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    base.PresentationLUTShape = "IDENTITY"
    base.ContentQualification = "RESEARCH"
    base.RecognizableVisualFeatures = "NO"
    base.AcquisitionContextSequence = Sequence()
    base.NumberOfFrames = n_z
    base.PixelPresentation = "MONOCHROME"
    base.VolumetricProperties = "VOLUME"
    base.VolumeBasedCalculationTechnique = "NONE"
    _dimension_organisation(base, uids)
    paths = []
    for t in range(n_t):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = uids.instance("enhanced", t)
        ds.InstanceNumber = t + 1
        ds.ContentDate = dicom_date(times[t])
        ds.ContentTime = dicom_time(times[t], 6)
        ds.AcquisitionNumber = t + 1
        ds.AcquisitionDateTime = dicom_datetime(times[t])
        ds.AcquisitionDuration = 1.0
        ds.SharedFunctionalGroupsSequence = Sequence([_shared_groups(series, uids.instance("irradiation", t))])
        ds.PerFrameFunctionalGroupsSequence = Sequence([_frame_groups(series, times[t], t, z) for z in range(n_z)])
        path = out_dir / f"EN_{t:04d}.dcm"
        save_instance(ds, path, syntax, stored_values(series.hu[t], profile.signed, profile.bits_stored))
        paths.append(path)
        progress(t + 1, n_t)
    return paths


def _dimension_organisation(ds: Dataset, uids: StudyUIDs) -> None:
    """Frames are indexed by (stack, position in stack, temporal position), all in Frame Content."""
    uid = uids.dimension_organisation()
    ds.DimensionOrganizationSequence = Sequence([item(DimensionOrganizationUID=uid)])
    ds.DimensionOrganizationType = "3D_TEMPORAL"
    frame_content = Tag("FrameContentSequence")
    ds.DimensionIndexSequence = Sequence(
        [
            item(
                DimensionOrganizationUID=uid,
                DimensionIndexPointer=Tag(keyword),
                FunctionalGroupPointer=frame_content,
                DimensionDescriptionLabel=label,
            )
            for keyword, label in (
                ("StackID", "Stack ID"),
                ("InStackPositionNumber", "In-Stack Position Number"),
                ("TemporalPositionIndex", "Temporal Position Index"),
            )
        ]
    )


def _shared_groups(series: CTPSeries, irradiation_uid: str) -> Dataset:
    spacing_z, spacing_y, spacing_x = series.spacing_mm
    columns = series.hu.shape[3]
    return item(
        PixelMeasuresSequence=Sequence(
            [
                item(
                    PixelSpacing=[ds_string(spacing_y), ds_string(spacing_x)],
                    SliceThickness=ds_string(spacing_z),
                    SpacingBetweenSlices=ds_string(spacing_z),
                )
            ]
        ),
        PlaneOrientationSequence=Sequence([item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])]),
        CTImageFrameTypeSequence=Sequence(
            [
                item(
                    FrameType=["ORIGINAL", "PRIMARY", "VOLUME", "NONE"],
                    PixelPresentation="MONOCHROME",
                    VolumetricProperties="VOLUME",
                    VolumeBasedCalculationTechnique="NONE",
                )
            ]
        ),
        FrameAnatomySequence=Sequence(
            [
                item(
                    AnatomicRegionSequence=Sequence(
                        [item(CodeValue="12738006", CodingSchemeDesignator="SCT", CodeMeaning="Brain")]
                    ),
                    FrameLaterality="B",
                )
            ]
        ),
        CTTableDynamicsSequence=Sequence([item(TableSpeed=0.0, TableFeedPerRotation=0.0, SpiralPitchFactor=0.0)]),
        CTAcquisitionTypeSequence=Sequence(
            [item(AcquisitionType="STATIONARY", ConstantVolumeFlag="NO", FluoroscopyFlag="NO")]
        ),
        CTAcquisitionDetailsSequence=Sequence(
            [
                item(
                    DataCollectionDiameter=ds_string(spacing_x * columns),
                    GantryDetectorTilt=0,
                    TableHeight=ds_string(150.0),
                    RotationDirection="CW",
                    RevolutionTime=1.0,
                    SingleCollimationWidth=0.625,
                    TotalCollimationWidth=float(spacing_z * series.hu.shape[1]),
                )
            ]
        ),
        CTGeometrySequence=Sequence(
            [item(DistanceSourceToDetector=ds_string(1040.0), DistanceSourceToDataCollectionCenter=540.0)]
        ),
        CTReconstructionSequence=Sequence(
            [
                item(
                    ReconstructionAlgorithm="FILTER_BACK_PROJ",
                    ConvolutionKernel="STANDARD",
                    ConvolutionKernelGroup="BRAIN",
                    ReconstructionAngle=360.0,
                    ImageFilter="NONE",
                    ReconstructionDiameter=ds_string(spacing_x * columns),
                    ReconstructionPixelSpacing=[float(spacing_y), float(spacing_x)],
                )
            ]
        ),
        CTExposureSequence=Sequence(
            [
                item(
                    ExposureTimeInms=1000.0,
                    XRayTubeCurrentInmA=100.0,
                    ExposureInmAs=100.0,
                    ExposureModulationType="NONE",
                )
            ]
        ),
        CTXRayDetailsSequence=Sequence(
            [item(KVP=ds_string(KVP), FocalSpots=[ds_string(0.7)], FilterType="BODY", FilterMaterial="ALUMINUM")]
        ),
        PixelValueTransformationSequence=Sequence(
            [
                item(
                    RescaleIntercept=ds_string(RESCALE_INTERCEPT),
                    RescaleSlope=ds_string(RESCALE_SLOPE),
                    RescaleType="HU",
                )
            ]
        ),
        FrameVOILUTSequence=Sequence([item(WindowCenter="40", WindowWidth="80")]),
        IrradiationEventIdentificationSequence=Sequence([item(IrradiationEventUID=irradiation_uid)]),
    )


def _frame_groups(series: CTPSeries, moment: datetime, t: int, z: int) -> Dataset:
    stamp = dicom_datetime(moment)
    position = series.slice_position(z)
    return item(
        FrameContentSequence=Sequence(
            [
                item(
                    FrameAcquisitionNumber=t + 1,
                    FrameReferenceDateTime=stamp,
                    FrameAcquisitionDateTime=stamp,
                    FrameAcquisitionDuration=1000.0,
                    StackID="1",
                    InStackPositionNumber=z + 1,
                    TemporalPositionIndex=t + 1,
                    DimensionIndexValues=[1, z + 1, t + 1],
                )
            ]
        ),
        PlanePositionSequence=Sequence([item(ImagePositionPatient=[ds_string(v) for v in position])]),
        CTPositionSequence=Sequence(
            [
                item(
                    TablePosition=float(position[2]),
                    ReconstructionTargetCenterPatient=[0.0, 0.0, float(position[2])],
                    DataCollectionCenterPatient=[0.0, 0.0, float(position[2])],
                )
            ]
        ),
    )
