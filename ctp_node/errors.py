"""The node's errors, in one hierarchy, split by what should happen next.

- ``CTPInputError`` (an *input fault*): the series itself is wrong (not CTP, incomplete, mixed,
  undecodable, RescaleSlope 0, no brain, a UID or a date that is not one, ...). Running it again gives the
  same answer, so the worker fails the job at once with the message and no traceback.
- ``TransientError`` (a *transient fault*): something outside the series failed (disk, peer,
  network, job store). Worth another try: the worker retries with backoff.
- ``ConfigError``: the node's configuration cannot be used; fix it and restart.

Raised where the fault is found and turned into DICOM statuses, job states or exit codes only at the
edge (the C-STORE handler, the process stage's classification table
``ctp_node.node.work.process_stage.FAULTS``, the CLI). ``model/`` cannot import the node: its input
errors (``model.PlanError``) are mapped in that table. Every message says what is wrong and what to do
about it; nothing is silently repaired.
"""

from __future__ import annotations


class CTPNodeError(Exception):
    """Base of every error the node raises on purpose."""


# --- input faults: the series is wrong; never retried ---------------------------------------------


class CTPInputError(CTPNodeError, ValueError):
    """The input cannot be used as a CT perfusion series (base of the input faults; catch this at the edge)."""


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


class InvalidUIDError(CTPInputError):
    """A UID that cannot be used (and so never becomes a path)."""


class InvalidHeaderError(CTPInputError):
    """A header value the pipeline needs cannot be used: a date or time that is not one, a code the
    outputs must state (PatientSex), an image matrix beyond ``[series] max_matrix``."""


class MotionError(CTPInputError):
    """The series cannot be checked for motion (too few volumes, NaN voxels, no skull in the slab)."""


class GridError(CTPInputError):
    """The series cannot be mapped to the model grid (no brain found, brain wider than the model FOV)."""


class DerivedSeriesError(CTPInputError):
    """The derived series cannot be written as asked (e.g. the source states RescaleSlope 0)."""


class PerfusionError(CTPInputError):
    """The series cannot be analysed as given (bad shape, bad times, no bolus, ...)."""


class PerfusionOutputError(CTPInputError):
    """The perfusion outputs cannot be written from what was given (the message says what to change)."""


class NoAIFError(PerfusionError):
    """No arterial input function could be found automatically."""


# --- transient faults: outside the series; retried with backoff -----------------------------------


class TransientError(CTPNodeError):
    """Disk, peer, network or job store failed; the same work may succeed later."""


class PeerError(TransientError, ConnectionError):
    """A DICOM peer could not be reached, refused the association, or answered with a failure."""


# --- configuration ---------------------------------------------------------------------------------


class ConfigError(CTPNodeError, ValueError):
    """The configuration cannot be used; the message says which key and why."""


class StoreMissingError(ConfigError):
    """Asked to open an existing job store, and there is none at that place."""


# --- coordination (not a fault) --------------------------------------------------------------------


class LeaseLost(CTPNodeError, RuntimeError):
    """Another worker holds the job now (our lease expired); stop without writing results."""
