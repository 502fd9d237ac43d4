"""`ctp-node jobs`, `echo`, `process`, `reprocess` through typer's CliRunner."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from typer.testing import CliRunner

from ctp_node.cli.main import app
from ctp_node.node.receive.scp import start_scp
from ctp_node.node.shared.jobs import JobStore, State, utcnow
from ctp_node.node.shared.spool import SeriesKey, Spool
from tests.cli_output import flat
from tests.integration.node_helpers import cpu_checkpoint, node_settings, phantom_files, write_config

runner = CliRunner()


@pytest.fixture()
def configured(tmp_path):
    settings = node_settings(tmp_path / "node", tmp_path / "net.pt", 4242)
    return settings, write_config(tmp_path / "ctp-node.toml", settings)


def test_jobs_list_show_retry_resend(configured):
    settings, config = configured
    store = JobStore(settings.database_url)
    store.record_instance("1.2.3", "1.2.3.4", "SCANNER", at=utcnow() - timedelta(seconds=120))
    store.queue_quiet_series(60)
    job = store.claim("w", 60)
    store.failed(job.id, "w", "IncompleteSeriesError: volume 3 lacks slice 7")
    result = runner.invoke(app, ["jobs", "list", "-c", str(config)])
    assert result.exit_code == 0 and "failed 1" in result.output and "volume 3 lacks" in flat(result.output)
    shown = json.loads(runner.invoke(app, ["jobs", "show", "1.2.3.4", "-c", str(config)]).output)
    assert shown["state"] == "failed" and shown["deliveries"] == []
    assert runner.invoke(app, ["jobs", "retry", str(job.id), "-c", str(config)]).exit_code == 0
    assert store.get(job.id).state == State.QUEUED
    refused = runner.invoke(app, ["jobs", "resend", str(job.id), "-c", str(config)])
    assert refused.exit_code == 2 and "no result" in flat(refused.output)
    store.claim("w", 60)
    store.processed(job.id, "w", 1, "/results", 1.0, ["pacs"])
    store.finish_sending(job.id, "w")
    assert runner.invoke(app, ["jobs", "resend", str(job.id), "-c", str(config)]).exit_code == 0
    assert store.get(job.id).state == State.SENDING
    # Both actions are in the audit trail (file and job store) with who took them, as the page's are;
    # the refused resend is not.
    trail = runner.invoke(app, ["jobs", "audit", "--series", "1.2.3.4", "--json", "-c", str(config)])
    actions = [json.loads(line) for line in trail.stdout.splitlines() if line.strip()]
    assert [(a["event"], a["via"], a["job"]) for a in actions] == [
        ("retry", "command line", job.id),
        ("resend", "command line", job.id),
    ], trail.output
    assert all(a["by"] for a in actions) and actions[1]["destinations"] == ["pacs"]
    in_file = [json.loads(line)["event"] for line in settings.storage.audit_log.read_text().splitlines()]
    assert in_file == ["retry", "resend"]
    missing = runner.invoke(app, ["jobs", "show", "9.9.9", "-c", str(config)])
    assert missing.exit_code == 2 and "no job" in flat(missing.output)
    bad_state = runner.invoke(app, ["jobs", "list", "--state", "weird", "-c", str(config)])
    assert bad_state.exit_code != 0


@pytest.mark.parametrize("command", [["list"], ["show", "1"], ["retry", "1"], ["resend", "1"]])
def test_jobs_against_a_store_that_does_not_exist_is_an_error(tmp_path, command):
    from tests.integration.node_helpers import write_config

    data = tmp_path / "typo"
    settings = node_settings(data, tmp_path / "net.pt", 4242)
    config = write_config(tmp_path / "ctp-node.toml", settings)
    result = runner.invoke(app, ["jobs", *command, "-c", str(config)])
    assert result.exit_code == 2
    assert f"no job store at {data / 'jobs.sqlite'}" in flat(result.output) and "no jobs" not in result.output
    assert not data.exists()  # nothing created


def test_serve_where_the_data_folder_cannot_be_written_says_what_to_set(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    settings = node_settings(blocker / "node", tmp_path / "net.pt", 4242)
    config = write_config(tmp_path / "ctp-node.toml", settings)
    result = runner.invoke(app, ["serve", "-c", str(config)])
    assert result.exit_code == 2, result.output
    text = flat(result.output)
    assert f"cannot write the node's data under {blocker / 'node'}" in text and "storage.data_dir" in text
    assert "Traceback" not in result.output


def test_jobs_list_shows_distinct_instances_and_the_warning(configured):
    from ctp_node.node.shared.completeness import CompletionPolicy, InstanceFacts

    settings, config = configured
    store = JobStore(settings.database_url)
    facts = [InstanceFacts(f"1.2.3.4.{i}", f"0.00\\0.00\\{i % 4}.00", None) for i in range(7)]
    store.record_instance("1.2.3", "1.2.3.4", "SCANNER", at=utcnow() - timedelta(seconds=700), instances=facts)
    store.record_instance("1.2.3", "1.2.3.4", "SCANNER", at=utcnow() - timedelta(seconds=700), instances=facts[:1])
    store.queue_quiet_series(CompletionPolicy(60, complete_quiet_period_s=10, incomplete_wait_s=600))
    result = runner.invoke(app, ["jobs", "list", "-c", str(config)])
    assert result.exit_code == 0 and "queued 1" in result.output
    listed = flat(result.output)  # the table wraps long cells
    assert "1 queued 7 " in listed and "queued incomplete" in listed and "after 600 s" in listed
    shown = json.loads(runner.invoke(app, ["jobs", "show", "1.2.3.4", "-c", str(config)]).output)
    assert shown["instances"] == 7 and "4 slice positions holding 1 to 2 instances" in shown["warning"]


def test_echo_configured_and_explicit_peers(tmp_path, configured):
    settings, config = configured
    peer = node_settings(tmp_path / "peer", tmp_path / "x.pt", None).dicom
    server = start_scp(peer, Spool(tmp_path / "peer-spool"), lambda r: None)
    try:
        ok = runner.invoke(app, ["echo", f"127.0.0.1:{peer.port}:{peer.ae_title}", "-c", str(config)])
        assert ok.exit_code == 0 and ok.output.startswith("ok")
        down = runner.invoke(app, ["echo", "pacs", "-c", str(config)])  # configured on port 4242: nobody there
        assert down.exit_code == 1 and "FAIL" in down.output
        bad = runner.invoke(app, ["echo", "not-a-peer", "-c", str(config)])
        assert bad.exit_code != 0
    finally:
        server.shutdown()


@pytest.mark.slow
def test_process_a_folder_and_reprocess_from_the_spool(tmp_path):
    files = phantom_files(tmp_path / "study" / "ctp", duration_s=13)
    (tmp_path / "study" / "README.txt").write_text("not DICOM")
    checkpoint = cpu_checkpoint(tmp_path / "net.pt")
    settings = node_settings(tmp_path / "node", checkpoint, None)
    config = write_config(tmp_path / "ctp-node.toml", settings)
    out = tmp_path / "out"
    result = runner.invoke(app, ["process", str(tmp_path / "study"), "-o", str(out), "-c", str(config)])
    assert result.exit_code == 0, result.output
    assert "not DICOM series members" in flat(result.output)
    (series_dir,) = list(out.iterdir())
    assert len(list(series_dir.glob("*.dcm"))) == 13 * 8
    # Its own output, routed back by a PACS rule, is refused rather than inpainted again.
    loop = runner.invoke(app, ["process", str(out), "-o", str(tmp_path / "loop"), "-c", str(config)])
    assert loop.exit_code == 1 and "own synthetic output" in flat(loop.output)

    import pydicom

    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    key = SeriesKey(ds.StudyInstanceUID, ds.SeriesInstanceUID)
    spool, store = Spool(settings.storage.spool_dir), JobStore(settings.database_url)
    for path in files:
        spool.write(key, pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID, path.read_bytes())
        store.record_instance(key.study_uid, key.series_uid, "S")
    again = runner.invoke(
        app, ["reprocess", key.series_uid, "-o", str(tmp_path / "again"), "--steps", "2", "-c", str(config)]
    )
    assert again.exit_code == 0, again.output
    assert len(list((tmp_path / "again" / key.series_uid).glob("*.dcm"))) == 13 * 8
    queued = runner.invoke(app, ["reprocess", key.series_uid, "-c", str(config)])
    assert queued.exit_code == 0 and store.find(key.series_uid).state == State.QUEUED
    refused = runner.invoke(app, ["reprocess", key.series_uid, "--steps", "3", "-c", str(config)])
    assert refused.exit_code != 0


def test_process_reports_an_empty_folder(tmp_path, configured):
    _, config = configured
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["process", str(tmp_path / "empty"), "-c", str(config)])
    assert result.exit_code == 2 and "no DICOM series" in flat(result.output)


@pytest.mark.slow
def test_reprocess_pulls_a_series_from_pacs_with_c_get(tmp_path):
    import pydicom

    from tests.peers import start_orthanc

    files = phantom_files(tmp_path / "study", duration_s=9)
    settings = node_settings(tmp_path / "node", cpu_checkpoint(tmp_path / "net.pt"), None)
    config = write_config(tmp_path / "ctp-node.toml", settings)
    modalities = {"ctpnode": {"AET": "CTPNODE", "Host": "127.0.0.1", "Port": settings.dicom.port, "AllowGet": True}}
    orthanc = start_orthanc(tmp_path / "orthanc", modalities=modalities)
    try:
        for path in files:
            orthanc.upload(path)
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        pacs = f"127.0.0.1:{orthanc.dicom_port}:ORTHANC"
        args = ["reprocess", ds.SeriesInstanceUID, "--from-pacs", pacs, "--study", ds.StudyInstanceUID]
        result = runner.invoke(app, [*args, "-o", str(tmp_path / "out"), "-c", str(config)])
        assert result.exit_code == 0, result.output
        assert f"pulled {len(files)} instances" in flat(result.output)
        assert len(list((tmp_path / "out" / ds.SeriesInstanceUID).glob("*.dcm"))) == 9 * 8
        missing = runner.invoke(
            app, ["reprocess", "1.2.3.999", "--from-pacs", pacs, "--study", "1.2.3", "-c", str(config)]
        )
        assert missing.exit_code == 2 and "C-GET" in flat(missing.output)
    finally:
        orthanc.stop()
