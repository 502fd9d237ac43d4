"""What every DICOM series the node writes says the same way: the node as equipment, the research-use
caution, the value lengths it cuts text to, and the code items both writers use.

The two writers are the 1 s series' (``ctp_node.series.derived``) and the perfusion outputs'
(``ctp_node.series.outputs``); neither imports the other for these. Encodings any writer uses, the
phantom's included (UIDs, dates and times, the pixel format), are ``ctp_node.series.dicom_attributes``.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from ctp_node import __version__

NODE_MANUFACTURER = "ctp-node"  # Manufacturer and ManufacturerModelName of everything the node writes
CAUTION = "CAUTION: Not for Diagnostic Use, for research use only."  # in every image's ImageComments
LO_MAX = 64  # Long String (LO), e.g. SeriesDescription: at most 64 characters
ST_MAX = 1024  # Short Text (ST), e.g. DerivationDescription: at most 1024 characters


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    """One Code Sequence item (CodeValue, CodingSchemeDesignator, CodeMeaning)."""
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def source_image_purpose() -> Dataset:
    """PurposeOfReferenceCodeSequence item of a SourceImageSequence entry (DCM 121322)."""
    return code_item("121322", "DCM", "Source image for image processing operation")


def processing_equipment_purpose() -> Dataset:
    """PurposeOfReferenceCodeSequence item of a ContributingEquipmentSequence entry (DCM 109102)."""
    return code_item("109102", "DCM", "Processing Equipment")


def equipment(ds: Dataset) -> None:
    """The node as the equipment that made ``ds``: Manufacturer, ManufacturerModelName, SoftwareVersions."""
    ds.Manufacturer = NODE_MANUFACTURER
    ds.ManufacturerModelName = NODE_MANUFACTURER
    ds.SoftwareVersions = __version__
