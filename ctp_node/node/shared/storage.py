"""Which storage backend holds the spool and the results: the local data folder (the default) or an
S3-compatible object store (``[storage.object_store]``). Chosen here only; every part of the node asks
for its spool or results through these functions."""

from __future__ import annotations

import contextlib
import secrets
import shutil
from pathlib import Path

from ctp_node.config import StorageSettings
from ctp_node.node.shared.object_results import ObjectResults
from ctp_node.node.shared.object_spool import ObjectSpool
from ctp_node.node.shared.object_store import ObjectStore, StoreUnavailable
from ctp_node.node.shared.spool import Spool
from ctp_node.permissions import make_dirs

AnySpool = Spool | ObjectSpool


def open_object_store(storage: StorageSettings) -> ObjectStore | None:
    """The configured object store, or None for the local folder. The bucket and credentials are
    checked now (ConfigError naming the key when wrong; a store that does not answer is not an error
    here: the receiver starts, refuses, and takes instances once the store is back)."""
    if storage.object_store is None:
        return None
    store = ObjectStore(storage.object_store)
    with contextlib.suppress(StoreUnavailable):
        store.check()
    return store


def open_spool(storage: StorageSettings, store: ObjectStore | None = None) -> AnySpool:
    """The spool: ``<data>/spool``, or the object store's (with ``<data>/spool/.incoming`` on this host)."""
    if storage.object_store is None:
        return Spool(storage.spool_dir)
    return ObjectSpool(storage.spool_dir, store or ObjectStore(storage.object_store))


def open_results(storage: StorageSettings, store: ObjectStore | None = None) -> ObjectResults | None:
    """The object store's results, or None for the local results folder (``ResultsLayout``)."""
    if storage.object_store is None:
        return None
    return ObjectResults(store or ObjectStore(storage.object_store))


def scratch_folder(scratch: Path, name: str) -> Path:
    """A new, empty folder ``<scratch>/<name>.<random>`` for one job's download or result; folders of the
    same name an earlier attempt left (a worker killed mid-job) are removed first: the caller holds the
    job's lease, so no one else is using them. Several workers may share one scratch folder."""
    make_dirs(scratch)
    for stale in scratch.glob(f"{name}.*"):
        shutil.rmtree(stale, ignore_errors=True)
    return make_dirs(scratch / f"{name}.{secrets.token_hex(6)}")
