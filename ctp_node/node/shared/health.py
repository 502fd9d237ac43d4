"""Back-pressure: whether the node can keep what it is sent now, and what to say when it cannot.

The receiver asks :meth:`ResourceHealth.refusal` before it stores an instance (C-STORE and STOW-RS,
``ctp_node.node.receive.ingest``): while the local disk is below ``storage.min_free_mb`` or the job
store or the object store is down, the instance is refused with 0xA700 (out of resources) and a
reason, instead of being acknowledged and then lost, or of making every sender wait on a dead store.
A sender retries later; a second receiver behind the same AE title takes the instances meanwhile.

A resource is marked down by the failure itself (a PUT, a job-store write) and by a check every
``storage.check_interval_s`` in a background thread; the same check finds it back, so the node
recovers by itself, without a restart. Every change is one log line, the gauge
``ctp_node_resource_available{resource}`` (1 up, 0 down), and the status page's health section
(``snapshot``); ``/healthz`` answers 503 naming the resources while any is down.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DISK = "disk"
JOB_STORE = "job_store"
OBJECT_STORE = "object_store"

Probe = Callable[[], None]
"""Raises while its resource cannot be used."""


@dataclass(frozen=True)
class ResourceState:
    """One resource as the status page shows it."""

    name: str
    available: bool
    detail: str  # why it is down, or what it is
    since: float  # time.time() of the last change


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged process may still write on the filesystem holding ``path``."""
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def one_line(exc: BaseException) -> str:
    """What failed, in one line: a database error by what the database said (SQLAlchemy's own text
    adds the statement and a link to its documentation)."""
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__


class ResourceHealth:
    """The state of the disk floor, the job store and the object store, kept current and shown."""

    def __init__(
        self,
        *,
        disk_paths: Sequence[Path] = (),
        min_free_bytes: int = 0,
        probes: Mapping[str, Probe] | None = None,
        check_interval_s: float = 5.0,
        on_change: Callable[[str, bool], None] | None = None,
    ) -> None:
        """``disk_paths``: folders whose filesystem must keep ``min_free_bytes`` free (0: no floor);
        ``probes``: the other resources by name; ``on_change(name, available)``: e.g. a metric."""
        self.disk_paths, self.min_free_bytes = tuple(Path(p) for p in disk_paths), min_free_bytes
        self.probes = dict(probes or {})
        self.check_interval_s = check_interval_s
        self.on_change = on_change
        now = time.time()
        names = ([DISK] if self.disk_paths and min_free_bytes > 0 else []) + list(self.probes)
        self._states = {name: ResourceState(name, True, "", now) for name in names}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        for name in names:
            if on_change is not None:
                on_change(name, True)

    # --- asked by the receiver, per instance -------------------------------------------------------

    def refusal(self) -> tuple[str, str] | None:
        """(reason label, comment for the sender) while the node cannot keep an instance, else None."""
        short = self._check_disk()
        if short is not None:
            return DISK, short
        with self._lock:
            down = [s for s in self._states.values() if not s.available and s.name != DISK]
        if down:
            first = down[0]
            return first.name, f"{first.name.replace('_', ' ')} unavailable: {first.detail}"
        return None

    def _check_disk(self) -> str | None:
        """Why the disk is below its floor (and marked down), or None (and marked up)."""
        if not self.disk_paths or self.min_free_bytes <= 0:
            return None
        for path in self.disk_paths:
            try:
                free = free_bytes(path)
            except OSError:  # not made yet: its parent's filesystem is the one that counts
                try:
                    free = free_bytes(path.parent)
                except OSError:
                    continue
            if free < self.min_free_bytes:
                why = f"{free >> 20} MB free on {path}, below storage.min_free_mb ({self.min_free_bytes >> 20} MB)"
                self.down(DISK, why)
                return f"node disk below its floor ({free >> 20} MB free)"
        self.up(DISK)
        return None

    # --- told by whoever meets a failure, and by the checks ----------------------------------------

    def down(self, name: str, detail: str) -> None:
        """Mark ``name`` unavailable (said once, when it changes)."""
        with self._lock:
            before = self._states.get(name)
            if before is not None and not before.available:
                return
            self._states[name] = ResourceState(name, False, detail, time.time())
        log.error("%s unavailable: %s; refusing instances (0xA700) until it is back", name, detail)
        if self.on_change is not None:
            self.on_change(name, False)

    def up(self, name: str) -> None:
        """Mark ``name`` available again (said once, with how long it was down)."""
        with self._lock:
            before = self._states.get(name)
            if before is not None and before.available:
                return
            now = time.time()
            self._states[name] = ResourceState(name, True, "", now)
        if before is not None:
            log.warning("%s available again after %.0f s; accepting instances", name, now - before.since)
        if self.on_change is not None:
            self.on_change(name, True)

    def check(self) -> None:
        """Run every check once (the disk floor, each probe)."""
        self._check_disk()
        for name, probe in self.probes.items():
            try:
                probe()
            except Exception as exc:
                self.down(name, one_line(exc))
            else:
                self.up(name)

    def snapshot(self) -> list[ResourceState]:
        with self._lock:
            return sorted(self._states.values(), key=lambda s: s.name)

    def problems(self) -> list[str]:
        """One line per resource that is down (empty: all well)."""
        return [f"{s.name}: {s.detail}" for s in self.snapshot() if not s.available]

    # --- the background check ----------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, daemon=True, name="resource-health")
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.check_interval_s):
            try:
                self.check()
            except Exception:  # a check must never end the thread that finds the node's way back
                log.exception("resource check failed; continuing")
