"""The retry policy: how long a failed attempt waits before the next, and when to give up.

One policy, the ``[send]`` settings' backoff, for both stages: a failed delivery (the send stage,
bounded by ``send.max_attempts``) and a failed processing attempt (the process stage, bounded by
``jobs.max_attempts``) wait ``initial_backoff_s * backoff_multiplier^(attempt - 1)``, capped at
``max_backoff_s``.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from ctp_node.config import SendSettings
from ctp_node.node.shared.jobs_read import utcnow


def backoff_s(attempt: int, policy: SendSettings) -> float:
    """Delay before attempt ``attempt + 1`` (attempt counts from 1): initial * multiplier^(attempt-1), capped."""
    return min(policy.initial_backoff_s * policy.backoff_multiplier ** max(attempt - 1, 0), policy.max_backoff_s)


def retry_at(attempt: int, max_attempts: int, policy: SendSettings) -> datetime | None:
    """When to try again after failed attempt ``attempt``; None when that was the last one allowed."""
    if attempt >= max_attempts:
        return None
    return utcnow() + timedelta(seconds=backoff_s(attempt, policy))
