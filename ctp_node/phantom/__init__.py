"""Digital CT perfusion phantom with trustworthy ground truth, and vendor-like DICOM studies of it.

``generate_phantom(PhantomConfig(...))`` returns a ``PhantomStudy``: a 1 s 4D HU series of an
analytic head and its ``PerfusionTruth``. ``sampling`` turns it into sparser acquisitions;
``dicom_study`` writes them as scanners would. ``generate_family_b(FamilyBConfig(seed=...))`` is an
independent phantom family (other anatomy, AIF, residue, noise texture) for held-out tests.
"""

from ctp_node.phantom.config import PhantomConfig
from ctp_node.phantom.family_b import FamilyBConfig, generate_family_b
from ctp_node.phantom.generator import PerfusionTruth, PhantomStudy, generate_phantom
from ctp_node.phantom.tissue import TissueLabel

__all__ = [
    "FamilyBConfig",
    "PerfusionTruth",
    "PhantomConfig",
    "PhantomStudy",
    "TissueLabel",
    "generate_family_b",
    "generate_phantom",
]
