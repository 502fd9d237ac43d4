"""The spool in an S3-compatible object store: the same contract as ``spool.Spool``, other places.

Keys (spelled here only): ``<prefix>spool/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.
An instance is acknowledged only once the store confirmed its PUT (``ObjectStore.put``), as the local
spool acknowledges only after fsync. A C-STORE data set still arrives in a local file (the host's
``<data>/spool/.incoming``, as with the local spool: memory per association stays one PDU), which is
sent to the store and removed whether it was stored or not: nothing of an instance outlives its
C-STORE on the receiving host.

A worker host reads a series by downloading it to its scratch folder (:meth:`ObjectSpool.fetch`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

from ctp_node.node.shared.completeness import InstanceFacts, read_facts
from ctp_node.node.shared.object_store import ObjectStore
from ctp_node.node.shared.spool import INCOMING_DIR, TMP_SUFFIX, UID_PATTERN, SeriesKey, check_uid
from ctp_node.permissions import make_dirs

SPOOL_PREFIX = "spool"
DOWNLOAD_THREADS = 8  # a series of ~1000 objects: the store's latency, not the bandwidth, bounds a download


class ObjectSpool:
    """Received instances as objects; ``root`` is the local folder holding only ``.incoming``."""

    def __init__(self, root: Path, store: ObjectStore) -> None:
        self.root = make_dirs(Path(root))
        self.store = store

    @property
    def incoming_dir(self) -> Path:
        return self.root / INCOMING_DIR

    def series_key(self, key: SeriesKey) -> str:
        """The key prefix of one series (its UIDs validated: they become key parts)."""
        return self.series_key_in(self.store, key)

    @staticmethod
    def series_key_in(store: ObjectStore, key: SeriesKey) -> str:
        """``series_key`` for a reader with a store and no spool (the status page)."""
        study = check_uid(key.study_uid, "StudyInstanceUID")
        series = check_uid(key.series_uid, "SeriesInstanceUID")
        return store.key(SPOOL_PREFIX, study, series) + "/"

    def instance_key(self, key: SeriesKey, sop_uid: str) -> str:
        return f"{self.series_key(key)}{check_uid(sop_uid, 'SOPInstanceUID')}.dcm"

    def write(self, key: SeriesKey, sop_uid: str, data: bytes | Sequence[bytes | memoryview]) -> str:
        """Store one instance; returns its ``s3://`` address once the store confirmed it (StoreUnavailable
        otherwise). A repeat of the same SOP Instance UID replaces the earlier object."""
        target = self.instance_key(key, sop_uid)
        self.store.put(target, data)
        return self.store.uri(target)

    def move_in(self, key: SeriesKey, sop_uid: str, source: Path) -> str:
        """Store a received file (under :attr:`incoming_dir`); the caller removes ``source`` either way."""
        target = self.instance_key(key, sop_uid)
        self.store.put(target, source)
        return self.store.uri(target)

    def objects(self, key: SeriesKey) -> list[tuple[str, datetime]]:
        """(SOP Instance UID, time stored) of every instance of a series."""
        prefix = self.series_key(key)
        found = []
        for item in self.store.list(prefix):
            name = item.key[len(prefix) :]
            if name.endswith(".dcm") and UID_PATTERN.match(name[:-4]):
                found.append((name[:-4], item.modified))
        return found

    def fetch(self, key: SeriesKey, folder: Path) -> list[Path]:
        """Download a series' instances into ``folder`` (made if missing); their local paths, sorted."""
        make_dirs(folder)
        uids = [uid for uid, _ in self.objects(key)]
        prefix = self.series_key(key)

        def one(uid: str) -> Path:
            return self.store.download(f"{prefix}{uid}.dcm", folder / f"{uid}.dcm")

        with ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
            return sorted(pool.map(one, uids))

    def facts(self, key: SeriesKey, sop_uids: Sequence[str]) -> list[InstanceFacts]:
        """The completeness facts of stored instances (for recovery at start: each is downloaded once)."""
        prefix = self.series_key(key)
        with tempfile.TemporaryDirectory(prefix="ctp-node-facts-", dir=self.root) as tmp:
            facts = []
            for uid in sop_uids:
                path = self.store.download(f"{prefix}{uid}.dcm", Path(tmp) / f"{uid}.dcm")
                facts.append(read_facts(path, uid))
                path.unlink()
            return facts

    def iter_series(self) -> Iterator[SeriesKey]:
        """Every series in the store (for recovery at start), skipping keys that are not UID-named."""
        head = self.store.key(SPOOL_PREFIX) + "/"
        seen: set[tuple[str, str]] = set()
        for item in self.store.list(head):
            parts = item.key[len(head) :].split("/")
            if len(parts) != 3 or not UID_PATTERN.match(parts[0]) or not UID_PATTERN.match(parts[1]):
                continue
            if (parts[0], parts[1]) not in seen:
                seen.add((parts[0], parts[1]))
                yield SeriesKey(parts[0], parts[1])

    def remove_partial_files(self) -> int:
        """Delete what a crash left in ``.incoming`` (never acknowledged); before the SCP listens."""
        removed = 0
        for tmp in self.incoming_dir.glob(f"*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
            removed += 1
        return removed
