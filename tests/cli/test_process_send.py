"""`ctp-node process --send` sends as the worker's send stage does: every file of the result (the 1 s
series and each perfusion output, ``ResultsLayout.files``) to each destination, DICOM or DICOMweb; and
`ctp-node worker --send-only` delivers a waiting result with no model loaded."""

from __future__ import annotations

import threading
from datetime import timedelta
from types import SimpleNamespace

import numpy as np
from pydicom import dcmread
from pynetdicom import AE, AllStoragePresentationContexts, evt
from typer.testing import CliRunner

from ctp_node.cli.main import app
from ctp_node.config import Destination
from ctp_node.node.shared.dicom_status import STATUS_SUCCESS
from ctp_node.node.shared.jobs import JobStore, State, utcnow
from ctp_node.node.shared.results import ResultsLayout
from ctp_node.node.work.scu import SendResult
from tests.cli_output import flat
from tests.integration.node_helpers import cpu_checkpoint, node_settings, write_config
from tests.node.dicom_helpers import ct_instance
from tests.ports import free_port

runner = CliRunner()


class Pacs:
    """A DICOM peer on loopback that stores every storage SOP class (the perfusion outputs included)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.stored: list[str] = []
        self._lock = threading.Lock()
        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event) -> int:
        with self._lock:
            self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return STATUS_SUCCESS

    def __enter__(self) -> Pacs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()


class FakeStow:
    """Stands in for the STOW-RS client (``send_files_dicomweb``): records what would have been posted."""

    def __init__(self) -> None:
        self.sent: dict[str, list[str]] = {}

    def __call__(self, files, destination, *args, **kwargs) -> list[SendResult]:
        self.sent.setdefault(destination.name, []).extend(str(p) for p in files)
        return [SendResult(p, STATUS_SUCCESS) for p in files]


def fake_run_series(pipeline, files, out_dir, progress=None):
    """The series pipeline's shape of result, written as it writes one: the 1 s series at the top of the
    result folder, each perfusion output in its own folder below (an untrained test model makes no
    perfusion outputs, and which files there are is all this test is about)."""
    out_dir.mkdir(parents=True)
    (out_dir / "perfusion" / "cbf").mkdir(parents=True)
    (out_dir / "perfusion" / "report").mkdir(parents=True)
    paths = [ct_instance(out_dir / f"CT_{i}.dcm", study="1.2.3", series="1.2.3.9", value=i) for i in range(3)]
    ct_instance(out_dir / "perfusion" / "cbf" / "CBF_0.dcm", study="1.2.3", series="1.2.3.8")
    ct_instance(out_dir / "perfusion" / "report" / "QA_0.dcm", study="1.2.3", series="1.2.3.7")
    derived = SimpleNamespace(count=3, series_uid="1.2.3.9", paths=[out_dir / f"CT_{i}.dcm" for i in range(3)])
    assert len(paths) == derived.count
    return SimpleNamespace(derived=derived, synthetic=np.ones(2), seconds={"total": 0.1}, guardrail=None, notes=[])


def test_process_sends_the_perfusion_outputs_to_dicom_and_dicomweb_destinations(tmp_path, monkeypatch):
    stow = FakeStow()
    monkeypatch.setattr("ctp_node.node.work.stow_client.send_files_dicomweb", stow)
    monkeypatch.setattr("ctp_node.series.pipeline.run_series", fake_run_series)
    (tmp_path / "study").mkdir()
    ct_instance(tmp_path / "study" / "0.dcm", study="1.2.3", series="1.2.3.4")
    settings = node_settings(tmp_path / "node", cpu_checkpoint(tmp_path / "net.pt"), None)
    web = Destination(name="web-pacs", kind="dicomweb", url="http://127.0.0.1:9/dicom-web")
    config = write_config(tmp_path / "ctp-node.toml", settings.model_copy(update={"destinations": (web,)}))
    out = tmp_path / "out"
    with Pacs() as pacs:
        args = ["process", str(tmp_path / "study"), "-o", str(out), "-c", str(config)]
        result = runner.invoke(app, [*args, "--send", "web-pacs", "--send", f"127.0.0.1:{pacs.port}:PACS"])
    assert result.exit_code == 0, result.output
    sent = ResultsLayout.files(out / "1.2.3.4")
    assert len(sent) == 5, "the 1 s series and both perfusion outputs"
    assert sorted(stow.sent["web-pacs"]) == sorted(str(p) for p in sent), "a DICOMweb destination is not refused"
    assert sorted(pacs.stored) == sorted(str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in sent)
    text = flat(result.output)
    assert "sent 5 instances to web-pacs" in text and "sent 5 instances to 127.0.0.1" in text


def test_process_refuses_an_unknown_destination_before_processing(tmp_path):
    settings = node_settings(tmp_path / "node", cpu_checkpoint(tmp_path / "net.pt"), None)
    config = write_config(tmp_path / "ctp-node.toml", settings)
    (tmp_path / "study").mkdir()
    ct_instance(tmp_path / "study" / "0.dcm", study="1.2.3", series="1.2.3.4")
    args = ["process", str(tmp_path / "study"), "-o", str(tmp_path / "out"), "-c", str(config), "--send", "nowhere"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "neither a configured destination" in flat(result.output)
    assert not (tmp_path / "out").exists(), "nothing processed for a send that cannot happen"


def test_worker_send_only_delivers_a_waiting_result_without_a_model(tmp_path):
    with Pacs() as pacs:
        pacs_destination = Destination(name="pacs", host="127.0.0.1", port=pacs.port, ae_title="PACS")
        settings = node_settings(tmp_path / "node", tmp_path / "no-such-model.pt", None)
        settings = settings.model_copy(update={"destinations": (pacs_destination,)})
        config = write_config(tmp_path / "ctp-node.toml", settings)
        store = JobStore(settings.database_url)
        store.record_instance("1.2.3", "1.2.3.4", "SCANNER", at=utcnow() - timedelta(seconds=120))
        store.queue_quiet_series(60)
        job = store.claim("w1", 60)
        result_dir = ResultsLayout.of(settings.storage).generation_dir("1.2.3", "1.2.3.4", job.generation)
        (result_dir / "perfusion" / "cbf").mkdir(parents=True)
        made = [ct_instance(result_dir / f"{i}.dcm", study="1.2.3", series="1.2.3.4.9", value=i) for i in range(2)]
        made.append(ct_instance(result_dir / "perfusion" / "cbf" / "0.dcm", study="1.2.3", series="1.2.3.4.8"))
        assert store.processed(job.id, "w1", job.generation, str(result_dir), 1.0, ["pacs"])
        store.finish_sending(job.id, "w1")  # the worker's pass found the PACS down: the result waits
        result = runner.invoke(app, ["worker", "--send-only", "--once", "-c", str(config)])
    assert result.exit_code == 0, result.output
    assert store.get(job.id).state == State.DONE
    assert sorted(pacs.stored) == sorted(str(ds.SOPInstanceUID) for ds in made)
