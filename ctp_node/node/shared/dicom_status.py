"""The DIMSE status codes the node answers and reads, named once (PS3.7 Annex C, PS3.4 B.2.3, C.4.3).

The receiver answers C-STORE with them, the send stage reads a peer's C-STORE answers, C-GET reads
the retrieve status, and STOW-RS reports the same codes per instance (PS3.18 Table 10.5.3-1).
"""

from __future__ import annotations

STATUS_SUCCESS = 0x0000

# Failures (the instance was not stored)
STATUS_PROCESSING_FAILURE = 0x0110  # general failure, e.g. an error while handling a STOW-RS part
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_OUT_OF_RESOURCES = 0xA700  # disk full, job store unavailable: try again later
STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000  # missing, invalid or inconsistent UIDs, an unreadable header

# Storage warnings: the instance was stored (so a send counts it as delivered)
STATUS_COERCION_OF_DATA_ELEMENTS = 0xB000
STATUS_ELEMENTS_DISCARDED = 0xB006
STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007

# C-GET / C-MOVE: the retrieve finished, with some sub-operations failed (same value as the coercion warning)
STATUS_SUBOPERATIONS_COMPLETE_WITH_FAILURES = 0xB000

STORED = frozenset(
    {
        STATUS_SUCCESS,
        STATUS_COERCION_OF_DATA_ELEMENTS,
        STATUS_ELEMENTS_DISCARDED,
        STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING,
    }
)
"""C-STORE answers after which the peer holds the instance."""

RETRIEVED = frozenset({STATUS_SUCCESS, STATUS_SUBOPERATIONS_COMPLETE_WITH_FAILURES})
"""C-GET final statuses after which the instances that arrived are usable."""
