"""deploy/nginx/ctp-node-status.conf in front of the status page: TLS, redirect, and an action posted through it.

nginx runs as a real process on loopback ports with a certificate made here; the configuration is
the shipped file with only its ports, certificate paths and upstream port replaced (and, for a
page under a path prefix, the location README describes). Skipped when nginx or openssl is missing,
failed instead under CTP_NODE_DEPLOY_CHECKS=required.
"""

from __future__ import annotations

import base64
import http.client
import os
import re
import ssl
import subprocess

import pytest

from ctp_node.node.shared.jobs import State
from ctp_node.web import start_web
from tests.deploy.tools import DEPLOY, need_program
from tests.peers import self_signed_certificate, stop_process
from tests.ports import free_port, wait_for_port
from tests.web.helpers import FAILED_SERIES, PASSWORD, USER, job_id, make_node

SITE = DEPLOY / "nginx" / "ctp-node-status.conf"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}


def _site(web_port: int, http_port: int, https_port: int, cert, key, prefix: str) -> str:
    text = SITE.read_text()
    replaced = {
        "listen 80;": f"listen 127.0.0.1:{http_port};",
        "listen 443 ssl;": f"listen 127.0.0.1:{https_port} ssl;",
        "/etc/ssl/ctp-node/cert.pem": str(cert),
        "/etc/ssl/ctp-node/key.pem": str(key),
        "proxy_pass http://127.0.0.1:8080;": f"proxy_pass http://127.0.0.1:{web_port};",
    }
    if prefix:  # as deploy/README.md says for a page under a path: the prefix is stripped on the way in
        replaced["location / {"] = f"location {prefix}/ {{"
        replaced["proxy_pass http://127.0.0.1:8080;"] = f"proxy_pass http://127.0.0.1:{web_port}/;"
    for old, new in replaced.items():
        assert old in text, f"{SITE} no longer has {old!r}: update this test with it"
        text = text.replace(old, new)
    return text


def _nginx(tmp_path, site: str) -> subprocess.Popen:
    nginx = need_program("nginx", "apt-get install nginx", ("/usr/sbin/nginx",))
    (tmp_path / "site.conf").write_text(site)
    temp = tmp_path / "nginx-temp"
    temp.mkdir()
    main = tmp_path / "nginx.conf"
    main.write_text(
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"daemon off;\npid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\nhttp {{\n"
        f"  access_log off;\n  client_body_temp_path {temp}/body;\n  proxy_temp_path {temp}/proxy;\n"
        f"  fastcgi_temp_path {temp}/fastcgi;\n  uwsgi_temp_path {temp}/uwsgi;\n  scgi_temp_path {temp}/scgi;\n"
        f"  include {tmp_path}/site.conf;\n}}\n"
    )
    checked = subprocess.run([nginx, "-t", "-c", str(main), "-p", str(tmp_path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    return subprocess.Popen([nginx, "-c", str(main), "-p", str(tmp_path)], stderr=subprocess.PIPE)


@pytest.mark.parametrize("prefix", ["", "/ctp-node"])
def test_the_page_through_the_shipped_nginx_configuration(tmp_path, prefix):
    cert, key = self_signed_certificate(tmp_path)
    settings, store = make_node(tmp_path / "data", root_path=prefix)
    server = start_web(settings, store, port=0)
    http_port, https_port = free_port(), free_port()
    proxy = _nginx(tmp_path, _site(server.port, http_port, https_port, cert, key, prefix))
    try:
        wait_for_port(https_port, proxy, "nginx")
        plain = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
        plain.request("GET", f"{prefix}/")
        redirect = plain.getresponse()
        assert redirect.status == 301 and redirect.getheader("location").startswith("https://")

        context = ssl.create_default_context(cafile=str(cert))
        origin = f"https://localhost:{https_port}"

        def call(method: str, path: str, body: str | None = None, headers: dict | None = None):
            connection = http.client.HTTPSConnection("localhost", https_port, context=context, timeout=10)
            connection.request(method, prefix + path, body=body, headers={**AUTH, **(headers or {})})
            response = connection.getresponse()
            return response, response.read().decode(errors="replace")

        health, text = call("GET", "/healthz", headers={"Authorization": ""})
        assert (health.status, text) == (200, "ok")
        assert health.getheader("strict-transport-security")
        listing, page = call("GET", "/")
        assert listing.status == 200 and f'href="{prefix}/static/style.css"' in page
        failed = job_id(store, FAILED_SERIES)
        _, job_page = call("GET", f"/jobs/{failed}")
        assert f'action="{prefix}/jobs/{failed}/retry"' in job_page
        csrf = re.search(r'name="csrf" value="([^"]+)"', job_page).group(1)
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        foreign, _ = call("POST", f"/jobs/{failed}/retry", f"csrf={csrf}", {**form, "Origin": "https://evil.example"})
        assert foreign.status == 403 and store.get(failed).state == State.FAILED
        # As a browser posts it: its Origin is the proxy's address, which the page sees as Host.
        posted, _ = call("POST", f"/jobs/{failed}/retry", f"csrf={csrf}", {**form, "Origin": origin})
        assert posted.status == 303 and posted.getheader("location") == f"{prefix}/jobs/{failed}?done=retry"
        assert store.get(failed).state == State.QUEUED
    finally:
        stop_process(proxy)
        server.stop()
