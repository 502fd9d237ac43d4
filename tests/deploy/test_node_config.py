"""deploy/compose/ctp-node.toml and the image's default file load, and the container health check
works against a real `ctp-node serve` started with the compose configuration (loopback, free ports)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ctp_node.config import load_settings
from ctp_node.errors import ConfigError
from tests.deploy.running import start_node
from tests.deploy.tools import COMPOSE_DIR, DEPLOY
from tests.peers import stop_process

HEALTHCHECK = DEPLOY / "bin" / "ctp-node-healthcheck"


def test_compose_configuration_loads():
    settings = load_settings(COMPOSE_DIR / "ctp-node.toml")
    # The checkpoint lives on a read-only mount of the deployment, not here: loading must not need it.
    assert settings.model.checkpoint == Path("/weights/published.pt") and not settings.model.checkpoint.exists()
    assert settings.metrics.port == 9108 and settings.metrics.bind_address == "0.0.0.0"
    assert "SYNTHETIC" in settings.output.series_description  # Orthanc's routing relies on it
    assert settings.database_url.startswith("postgresql+psycopg://")


def test_image_default_configuration_loads():
    settings = load_settings(DEPLOY / "docker" / "ctp-node.toml")
    assert str(settings.storage.data_dir) == "/var/lib/ctp-node"
    assert settings.dicom.port == 11112 and settings.metrics.port == 9108
    assert not settings.destinations and settings.jobs.database_url is None


def test_a_broken_file_is_refused(tmp_path):
    """load_settings does reject a bad deployment file, so the two tests above can fail."""
    bad = tmp_path / "ctp-node.toml"
    bad.write_text((COMPOSE_DIR / "ctp-node.toml").read_text().replace("port = 11112", "port = 111120"))
    with pytest.raises(ConfigError, match="port"):
        load_settings(bad)


def healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(HEALTHCHECK)], env=env, capture_output=True, text=True, timeout=60)


def test_healthcheck_echoes_the_running_node(tmp_path, s3):
    proc, env, port = start_node(tmp_path, s3)
    try:
        run = healthcheck(env)
        assert run.returncode == 0, run.stdout + run.stderr
        assert f"CTPNODE at 127.0.0.1:{port} answered C-ECHO" in run.stdout
    finally:
        stop_process(proc)
    down = healthcheck(env)
    assert down.returncode != 0, "the check must fail when nothing answers"


def test_healthcheck_fails_when_the_node_refuses_its_own_ae(tmp_path, s3):
    """Why ctp-node.toml lists CTPNODE@127.0.0.1 among allowed_callers: without it the node is 'unhealthy'."""
    only_pacs = json.dumps([{"ae_title": "ORTHANC"}])
    proc, env, _ = start_node(tmp_path, s3, CTP_NODE_DICOM__ALLOWED_CALLERS=only_pacs)
    try:
        run = healthcheck(env)
        assert run.returncode != 0, run.stdout + run.stderr
    finally:
        stop_process(proc)
    assert "rejected association from CTPNODE@127.0.0.1" in (tmp_path / "serve.log").read_text()
