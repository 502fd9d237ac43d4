"""The status page served over a socket: by start_web in this process, and by a real `ctp-node serve`."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from ctp_node.web import start_web
from tests.peers import stop_process
from tests.ports import free_port, wait_for_port
from tests.web.helpers import TOKEN, make_node


def get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_start_web_serves_on_loopback_and_stops(tmp_path):
    settings, store = make_node(tmp_path / "data")
    server = start_web(settings, store, port=0)
    try:
        assert server.host == "127.0.0.1"
        assert get(server.url + "healthz") == (200, "ok")
        assert get(server.url)[0] == 401
        status, page = get(server.url, TOKEN)
        assert status == 200 and "Series jobs" in page
        with pytest.raises(OSError):  # the port is taken: an error for `serve` to report, not a dead thread
            start_web(settings, store, port=server.port)
    finally:
        server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.url + "healthz", timeout=2)


def _config_text(tmp_path, web_port: int) -> str:
    return (
        f'[dicom]\nbind_address = "127.0.0.1"\nport = {free_port()}\n'
        f'[storage]\ndata_dir = "{tmp_path / "data"}"\n'
        f"[web]\nenabled = true\nport = {web_port}\n"
    )


TOKEN_FROM_ENV = 'token = {env = "CTP_NODE_WEB_TOKEN"}\n'


def _config(tmp_path, web_port: int) -> str:
    config = tmp_path / "node.toml"
    config.write_text(_config_text(tmp_path, web_port) + TOKEN_FROM_ENV)
    return str(config)


def test_serve_runs_the_page_when_enabled_and_keeps_the_token_out_of_the_log(tmp_path):
    web_port = free_port()
    log = tmp_path / "serve.log"
    env = {"CTP_NODE_WEB_TOKEN": TOKEN, "PATH": "/usr/bin:/bin"}
    command = [
        sys.executable,
        "-m",
        "ctp_node",
        "serve",
        "--config",
        _config(tmp_path, web_port),
        "--log-level",
        "DEBUG",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_port(web_port, proc, "ctp-node serve's status page", timeout_s=60)
        base = f"http://127.0.0.1:{web_port}/"
        assert get(base + "healthz") == (200, "ok")
        assert get(base)[0] == 401
        status, page = get(base, TOKEN)
        assert status == 200 and "No jobs" in page
    finally:
        stop_process(proc)
    assert proc.returncode == 0, log.read_text()
    text = log.read_text()
    assert f"status page on http://127.0.0.1:{web_port}/" in text
    assert TOKEN not in text


def test_serve_says_when_the_pages_port_is_taken(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "ctp_node", "serve", "--config", _config(tmp_path, port)],
            capture_output=True, text=True, timeout=120, env={"CTP_NODE_WEB_TOKEN": TOKEN, "PATH": "/usr/bin:/bin"},
        )  # fmt: skip
    assert result.returncode == 2
    assert f"status page on 127.0.0.1:{port}" in result.stderr + result.stdout


def test_serve_stops_when_the_pages_secret_cannot_be_read(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text(_config_text(tmp_path, free_port()) + f'token = {{file = "{tmp_path / "missing-token"}"}}\n')
    result = subprocess.run(
        [sys.executable, "-m", "ctp_node", "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 2
    assert "web.token: cannot read the secret file" in result.stderr
