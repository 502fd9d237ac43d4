"""Why a set of DICOM instances cannot become a CT perfusion series.

One small hierarchy, raised by the assembler and turned into DICOM statuses or job states only at
the edge (the C-STORE handler, the job runner, the CLI). Every message says what is wrong with the
input and what to do about it; nothing is silently repaired or dropped.
"""

from __future__ import annotations


class CTPInputError(ValueError):
    """The input cannot be used as a CT perfusion series (base class; catch this at the edge)."""


class NotCTPError(CTPInputError):
    """The instances are not a CT perfusion series: not CT, one time point only, or no timing."""


class IncompleteSeriesError(CTPInputError):
    """Some volume lacks slices (the series is still arriving, or instances were lost)."""


class MixedGeometryError(CTPInputError):
    """The instances do not share one grid (orientation, pixel spacing, matrix, slice positions)."""


class MixedSeriesError(CTPInputError):
    """The instances belong to more than one series, study or SOP class."""


class UndecodableError(CTPInputError):
    """A file is not readable DICOM, or its pixel data cannot be decoded."""
