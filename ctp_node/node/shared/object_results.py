"""Results in an S3-compatible object store: the results layout of ``results.ResultsLayout`` as keys.

Keys (spelled here only):
``<prefix>results/<StudyInstanceUID>/<SeriesInstanceUID>/g<generation>/<attempt>/<path>``, ``<path>``
being the file's path in the result folder the processor wrote (``*.dcm``, ``perfusion/<output>/*.dcm``,
the QA report, ``guardrail.json``) and ``<attempt>`` a token of one processing attempt. The worker
writes a result into a local staging folder, uploads every file under its own attempt, and only then
records the attempt's ``s3://`` address in the job store: that record is the commit (no rename exists
in S3), so a result is sent whole or not at all. Each attempt has its own keys because two attempts
can overlap: a worker cut off from the network loses its lease, another host processes and records
the series, and the first one, back, uploads before it learns that its lease is gone; with one
folder per generation it replaced the recorded result's files under a running send (found by
tests/multihost). The attempt that recorded removes the others' objects (``keep_only``); one that
could not record removes its own (``discard``), and a failed upload its part, if the store answers. An
attempt cut off from the store while uploading can leave a partial upload that nothing references: never
sent (only a recorded address is), removed by a bucket lifecycle rule on ``results/`` (deploy/README.md).
The send stage downloads a result into its scratch folder and sends it as it sends a local one.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from ctp_node.node.shared.object_store import ObjectStore
from ctp_node.node.shared.spool import check_uid
from ctp_node.permissions import make_dirs

RESULTS_PREFIX = "results"
TRANSFER_THREADS = 8


class ObjectResults:
    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def generation_key(self, study_uid: str, series_uid: str, generation: int) -> str:
        study = check_uid(study_uid, "StudyInstanceUID")
        series = check_uid(series_uid, "SeriesInstanceUID")
        return self.store.key(RESULTS_PREFIX, study, series, f"g{int(generation)}") + "/"

    def publish(self, staging: Path, study_uid: str, series_uid: str, generation: int, attempt: str) -> str:
        """Upload every file of a finished result folder under its own ``attempt`` (a token of letters
        and digits); the ``s3://`` address of that attempt's folder. Nothing else is touched."""
        if not attempt.isalnum():
            raise ValueError(f"attempt token {attempt!r} must be letters and digits")
        prefix = self.generation_key(study_uid, series_uid, generation) + attempt + "/"
        files = [p for p in sorted(staging.rglob("*")) if p.is_file() and not p.name.startswith(".")]

        def one(path: Path) -> None:
            self.store.put(prefix + path.relative_to(staging).as_posix(), path)

        try:
            with ThreadPoolExecutor(TRANSFER_THREADS) as pool:
                list(pool.map(one, files))
        except BaseException:
            with contextlib.suppress(Exception):  # never recorded: removed if the store still answers
                self.store.delete_prefix(prefix)
            raise
        return self.store.uri(prefix.rstrip("/"))

    def discard(self, uri: str) -> None:
        """Remove one attempt's objects (a result that was not recorded)."""
        self.store.delete_prefix(self.store.key_of(uri).rstrip("/") + "/")

    def keep_only(self, uri: str, study_uid: str, series_uid: str, generation: int) -> int:
        """Remove every other attempt's objects of this generation (uploaded, never recorded: a worker
        that lost its lease or crashed after uploading); how many objects went."""
        kept = self.store.key_of(uri).rstrip("/") + "/"
        generation_prefix = self.generation_key(study_uid, series_uid, generation)
        others = {o.key[len(generation_prefix) :].split("/", 1)[0] for o in self.store.list(generation_prefix)}
        removed = 0
        for other in sorted(others):
            prefix = generation_prefix + other + "/"
            if prefix != kept:
                removed += self.store.delete_prefix(prefix)
        return removed

    def fetch(self, uri: str, folder: Path) -> Path:
        """Download a recorded result (its ``s3://`` address) into ``folder``, keeping its paths."""
        prefix = self.store.key_of(uri).rstrip("/") + "/"
        keys = [o.key for o in self.store.list(prefix)]
        make_dirs(folder)

        def one(key: str) -> None:
            relative = Path(key[len(prefix) :])
            if relative.is_absolute() or ".." in relative.parts:  # never write outside the folder
                raise ValueError(f"object key {key} leaves its result folder")
            target = folder / relative
            make_dirs(target.parent)
            self.store.download(key, target)

        with ThreadPoolExecutor(TRANSFER_THREADS) as pool:
            list(pool.map(one, keys))
        return folder

    # --- read only: what the status page shows of a recorded result ----------------------------------

    def objects(self, uri: str, limit: int) -> tuple[list[tuple[str, int]], bool]:
        """Up to ``limit`` objects of a recorded result (its ``s3://`` address), in key order, as (path
        within the result, size): one listing of its prefix, stopped there; and whether more were left."""
        prefix = self.store.key_of(uri).rstrip("/") + "/"
        found: list[tuple[str, int]] = []
        for stored in self.store.list(prefix):
            if len(found) >= limit:
                return found, True
            found.append((stored.key[len(prefix) :], stored.size))
        return found, False

    def read(self, uri: str, relative: str, *, first_bytes: int | None = None, max_bytes: int = 64 << 20) -> bytes:
        """One object of a recorded result (``relative``: its path within the result), whole or only its
        first ``first_bytes`` (a ranged GET); ValueError for a path that leaves the result or an object
        over ``max_bytes``, StoreUnavailable when the store does not answer."""
        parts = PurePosixPath(relative).parts
        if not relative or relative.startswith("/") or ".." in parts:
            raise ValueError(f"{relative!r} is not a path within the result {uri}")
        key = self.store.key_of(uri).rstrip("/") + "/" + relative
        data = self.store.get(key, first_bytes=first_bytes, max_bytes=max_bytes)
        if len(data) > max_bytes:
            raise ValueError(f"{uri}/{relative} is larger than {max_bytes} bytes")
        return data
