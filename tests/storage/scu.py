"""What the storage tests send: small CT instances, C-STOREd by pynetdicom on one association."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from tests.node.dicom_helpers import ct_instance


def send(port: int, paths: list[Path]) -> list[tuple[int | None, str]]:
    """C-STORE each file on one association: (status, ErrorComment) of each; status None: no answer."""
    ae = AE(ae_title="SCANNER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="CTPNODE")
    assert assoc.is_established
    answers: list[tuple[int | None, str]] = []
    try:
        for path in paths:
            answer = assoc.send_c_store(dcmread(path))
            status = int(answer.Status) if "Status" in answer else None
            answers.append((status, str(answer.get("ErrorComment", ""))))
    finally:
        assoc.release()
    return answers


def instances(folder: Path, count: int, series: tuple[str, str] | None = None) -> list[Path]:
    """``count`` small CT instances of ``series`` (study, series UIDs), or of a new one, in ``folder``
    (numbered on from what the folder holds)."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series_uid = series or (generate_uid(), generate_uid())
    first = len(list(folder.iterdir()))
    paths = [folder / f"{first + i:04d}.dcm" for i in range(count)]
    for path in paths:
        ct_instance(path, study=study, series=series_uid)
    return paths
