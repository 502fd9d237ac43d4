"""Results in an S3-compatible object store: the results layout of ``results.ResultsLayout`` as keys.

Keys (spelled here only): ``<prefix>results/<StudyInstanceUID>/<SeriesInstanceUID>/g<generation>/<path>``,
``<path>`` being the file's path in the result folder the processor wrote (``*.dcm``,
``perfusion/<output>/*.dcm``, the QA report, ``guardrail.json``). The worker writes a result into a
local staging folder, uploads every file, and only then records the result's ``s3://`` address in the
job store: that record is the commit (no rename exists in S3), so a result is sent whole or not at all.
An earlier attempt's objects under the same generation are removed first. The send stage downloads a
result into its scratch folder and sends it as it sends a local one.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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

    def publish(self, staging: Path, study_uid: str, series_uid: str, generation: int) -> str:
        """Upload every file of a finished result folder; its ``s3://`` address (of the folder)."""
        prefix = self.generation_key(study_uid, series_uid, generation)
        self.store.delete_prefix(prefix)  # an attempt that uploaded but was never recorded
        files = [p for p in sorted(staging.rglob("*")) if p.is_file() and not p.name.startswith(".")]

        def one(path: Path) -> None:
            self.store.put(prefix + path.relative_to(staging).as_posix(), path)

        with ThreadPoolExecutor(TRANSFER_THREADS) as pool:
            list(pool.map(one, files))
        return self.store.uri(prefix.rstrip("/"))

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
