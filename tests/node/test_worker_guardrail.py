"""The guardrail's verdict on a result: stored on the job, logged, audited, shown by `ctp-node jobs show`."""

from __future__ import annotations

import json
import logging

from typer.testing import CliRunner

from ctp_node.cli.main import app
from ctp_node.node.work.process_stage import ProcessOutput
from ctp_node.node.work.worker import Worker
from tests.integration.node_helpers import write_config
from tests.node.worker_helpers import FakeSender

FLAG = "flagged: grey offset -2.20 HU (tolerance 1 HU)"


def processor(verdict):
    def process(job, files, out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "0.dcm").write_bytes(b"result")
        return ProcessOutput(out_dir, 1, verdict)

    return process


def test_a_flagged_result_is_recorded_logged_audited_and_shown(env, tmp_path, caplog):  # noqa: F811
    settings, store = env
    worker = Worker(settings, store, processor(FLAG), sender=FakeSender([0x0000]), worker_id="w1")
    with caplog.at_level(logging.WARNING, logger="ctp_node.node.work.process_stage"):
        job = worker.run_once()
    done = store.get(job.id)
    assert done.guardrail == FLAG and done.state.value == "done"  # the flag policy still sends it
    assert f"the guardrail {FLAG}" in caplog.text
    processed = [e for e in worker.audit.read() if e["event"] == "processed"]
    assert processed[-1]["guardrail"] == FLAG
    config = write_config(tmp_path / "ctp-node.toml", settings)
    shown = json.loads(CliRunner().invoke(app, ["jobs", "show", str(job.id), "-c", str(config)]).output)
    assert shown["guardrail"] == FLAG


def test_a_passing_result_is_recorded_without_a_warning(env, caplog):  # noqa: F811
    settings, store = env
    worker = Worker(settings, store, processor("pass: grey offset +0.10 HU"), sender=FakeSender([0]), worker_id="w")
    with caplog.at_level(logging.WARNING, logger="ctp_node.node.work.process_stage"):
        job = worker.run_once()
    assert store.get(job.id).guardrail.startswith("pass") and "guardrail" not in caplog.text
