"""The status page's health information (issue 22 item 4): /healthz and the job list say what the
receiver refuses instances for, and stop saying it once the resource is back."""

from __future__ import annotations

from fastapi.testclient import TestClient

from ctp_node.node.receive.receiver import Receiver
from ctp_node.web import create_app
from tests.web.helpers import BEARER, make_node


def test_healthz_and_the_job_list_show_what_the_receiver_refuses_for(tmp_path):
    settings, store = make_node(tmp_path / "data")
    receiver = Receiver(settings, store)  # not started: its health is what the page reads
    with TestClient(create_app(settings, store, receiver=receiver)) as client:
        assert client.get("/healthz").text == "ok"
        page = client.get("/", headers=BEARER).text
        assert "Storage:" in page and "job_store ok" in page and "Refusing" not in page

        receiver.health.down("object_store", "object store http://127.0.0.1:9 bucket ctp: HEAD bucket: refused")
        answer = client.get("/healthz")
        assert answer.status_code == 503
        assert answer.text == "refusing instances: object_store unavailable"  # no host or bucket without a login
        page = client.get("/", headers=BEARER).text
        assert "Refusing instances (0xA700, out of resources)" in page and "object_store since" in page
        assert "http://127.0.0.1:9 bucket ctp" in page
        assert receiver.metrics.resource_available.labels("object_store")._value.get() == 0

        receiver.health.up("object_store")
        assert client.get("/healthz").text == "ok"
        assert "Refusing" not in client.get("/", headers=BEARER).text
