"""The status page over a node's job store: authentication, masking, pages, actions and their CSRF checks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ctp_node.config import Credential
from ctp_node.node.shared.jobs import State
from ctp_node.web import create_app
from ctp_node.web.auth import Authenticator
from tests.web.helpers import (
    BEARER,
    DONE_SERIES,
    FAILED_SERIES,
    PATIENT_ID,
    RECEIVING_SERIES,
    TOKEN,
    USER,
    basic,
    job_id,
    make_node,
    settings_for,
)


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, "the job page has no action form"
    return match.group(1)


def test_health_needs_no_authentication(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.text == "ok"


def test_health_reports_a_job_store_that_does_not_answer(node, monkeypatch):
    settings, store = node
    app = create_app(settings, store)

    def down():
        raise ConnectionError("database is down")

    monkeypatch.setattr(store.read, "counts", down)
    with TestClient(app) as c:
        response = c.get("/healthz")
    assert response.status_code == 503 and "job store" in response.text


@pytest.mark.parametrize("path", ["/", "/jobs/1", "/jobs/1/figures/qa/curves.png", "/static/style.css"])
def test_everything_but_health_needs_authentication(client, path):
    response = client.get(path)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Basic ")  # a browser asks for the user
    assert "PAT" not in response.text and "DOE" not in response.text


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer wrong-token-of-some-length"},
        {"Authorization": f"Bearer {TOKEN}x"},
        basic(password="wrong password"),
        basic(user="someone", password="correct horse battery staple"),
        {"Authorization": "Basic not-base64!"},
        {"Authorization": f"Token {TOKEN}"},
    ],
)
def test_wrong_credentials_are_refused(client, headers):
    assert client.get("/", headers=headers).status_code == 401


@pytest.mark.parametrize("headers", [BEARER, basic()])
def test_the_token_or_the_basic_user_opens_the_job_list(client, node, headers):
    _, store = node
    response = client.get("/", headers=headers)
    assert response.status_code == 200
    for series in (DONE_SERIES, FAILED_SERIES, RECEIVING_SERIES):
        assert f'class="job-link" href="/jobs/{job_id(store, series)}"' in response.text
    assert response.text.count('class="job-link"') == 3
    assert "RESEARCH USE ONLY" in response.text


def test_token_only_configuration_challenges_for_a_bearer_token(tmp_path):
    settings, store = make_node(tmp_path, basic_user=None, basic_password_hash=None)
    with TestClient(create_app(settings, store)) as c:
        refused = c.get("/", headers=basic())
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
        assert c.get("/", headers=BEARER).status_code == 200


def test_the_job_list_shows_states_timings_errors_and_deliveries(client, node):
    _, store = node
    page = client.get("/", headers=basic()).text
    for state in ("done", "failed", "receiving"):
        assert f'<span class="badge {state}">{state}</span>' in page
    assert "pacs: sent" in page
    assert "only 2 time points" in page
    assert ">pass<" in page  # the guardrail's status
    assert "CTP 4D" in page and "2026-01-01" in page  # the StudyDate as a date (issue 25)
    failed_only = client.get("/?state=failed", headers=basic()).text
    assert failed_only.count('class="job-link"') == 1 and "only 2 time points" in failed_only
    assert client.get("/?state=bogus", headers=basic()).status_code == 400


def test_patient_name_and_id_are_masked_by_default(client):
    for path in ("/", f"/jobs/{1}"):
        page = client.get(path, headers=basic()).text
        assert "DOE" not in page and "JOHN" not in page and PATIENT_ID not in page
        assert "D. J." in page and "\u2022\u2022\u2022456" in page


def test_masking_can_be_switched_off(tmp_path):
    settings, store = make_node(tmp_path, mask_patient=False)
    with TestClient(create_app(settings, store)) as c:
        page = c.get("/", headers=BEARER).text
    assert "DOE^JOHN" in page and PATIENT_ID in page


def test_the_job_page_shows_guardrail_derived_series_figures_and_audit_trail(client, node):
    _, store = node
    done = job_id(store, DONE_SERIES)
    page = client.get(f"/jobs/{done}", headers=basic()).text
    assert "pass: grey offset +0.10 HU" in page and "5120" in page  # guardrail.json's checks
    assert "CTP1S" in page and "1s SYNTHETIC - RESEARCH USE ONLY" in page and f"{DONE_SERIES}.1000" in page
    assert f'src="/jobs/{done}/figures/qa/curves.png"' in page
    assert "SCANNER from" in page  # received instances, summarised
    for event in ("processing", "processed", "sent"):
        assert f"<td>{event}</td>" in page
    assert "waiting for a worker" in page and "sending" in page
    figure = client.get(f"/jobs/{done}/figures/qa/curves.png", headers=basic())
    assert figure.status_code == 200 and figure.headers["content-type"] == "image/png"
    assert figure.content.startswith(b"\x89PNG")


def test_pages_forbid_scripts_framing_and_caching(client):
    response = client.get("/", headers=basic())
    assert "default-src 'none'" in response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY" and response.headers["cache-control"] == "no-store"
    assert "<script" not in response.text


def test_a_missing_job_is_404(client):
    page = client.get("/jobs/9999", headers={**basic(), "Accept": "text/html"})
    assert page.status_code == 404 and "there is no job 9999" in page.text and "back to the job list" in page.text
    data = client.get("/jobs/9999", headers=basic())  # a script: JSON
    assert data.status_code == 404 and "there is no job 9999" in data.json()["detail"]
    assert client.post("/jobs/9999/retry", headers=BEARER, data={}).status_code == 404


@pytest.mark.parametrize(
    "name", ["..%2F..%2Fjobs.sqlite", "qa%2F..%2Fguardrail.json", "CTP1S_0000_000.dcm", "missing.png"]
)
def test_only_listed_figures_are_served(client, node, name):
    _, store = node
    response = client.get(f"/jobs/{job_id(store, DONE_SERIES)}/figures/{name}", headers=basic())
    assert response.status_code == 404 and "has no figure" in response.text


def test_retry_from_the_page_queues_the_job_again_and_is_audited(client, node):
    settings, store = node
    failed = job_id(store, FAILED_SERIES)
    page = client.get(f"/jobs/{failed}", headers=basic()).text
    assert 'id="retry"' in page and 'id="resend"' not in page  # a failed job without a result: retry only
    response = client.post(
        f"/jobs/{failed}/retry", headers=basic(), data={"csrf": csrf_of(page)}, follow_redirects=False
    )
    assert response.status_code == 303 and response.headers["location"] == f"/jobs/{failed}?done=retry"
    job = store.get(failed)
    assert job.state == State.QUEUED and job.error is None
    from ctp_node.node.shared.audit import AuditLog

    retry = [e for e in AuditLog(settings.storage.audit_log).read() if e["event"] == "retry"]
    assert retry and retry[-1]["by"] == USER and retry[-1]["series_uid"] == FAILED_SERIES
    assert "Queued again" in client.get(response.headers["location"], headers=basic()).text


def test_retry_is_refused_while_a_series_is_still_arriving(client, node):
    _, store = node
    receiving = job_id(store, RECEIVING_SERIES)
    response = client.post(f"/jobs/{receiving}/retry", headers=BEARER, data={})
    assert response.status_code == 409 and "receiving" in response.text
    assert store.get(receiving).state == State.RECEIVING


@pytest.mark.parametrize(
    "form, headers",
    [
        ({}, {}),  # no token
        ({"csrf": "1700000000.deadbeef"}, {}),  # a made-up one
        ({"csrf": "not a token"}, {}),
        ("valid", {"Origin": "https://evil.example"}),  # the page's token, posted from another site
        ("valid", {"Origin": "null"}),
    ],
)
def test_a_browser_action_without_the_pages_token_or_from_another_site_is_refused(client, node, form, headers):
    _, store = node
    failed = job_id(store, FAILED_SERIES)
    if form == "valid":
        form = {"csrf": csrf_of(client.get(f"/jobs/{failed}", headers=basic()).text)}
    response = client.post(f"/jobs/{failed}/retry", headers={**basic(), **headers}, data=form)
    assert response.status_code == 403
    assert store.get(failed).state == State.FAILED  # nothing changed


def test_a_token_from_an_old_page_expires(client, node, monkeypatch):
    _, store = node
    failed = job_id(store, FAILED_SERIES)
    token = csrf_of(client.get(f"/jobs/{failed}", headers=basic()).text)
    import ctp_node.web.auth as auth

    later = auth.time.time() + auth.CSRF_MAX_AGE_S + 60
    monkeypatch.setattr(auth.time, "time", lambda: later)
    response = client.post(f"/jobs/{failed}/retry", headers=basic(), data={"csrf": token})
    assert response.status_code == 403 and "stale" in response.text


def test_the_pages_own_origin_passes(client, node):
    _, store = node
    failed = job_id(store, FAILED_SERIES)
    token = csrf_of(client.get(f"/jobs/{failed}", headers=basic()).text)
    response = client.post(
        f"/jobs/{failed}/retry",
        headers={**basic(), "Origin": "http://testserver", "Host": "testserver"},
        data={"csrf": token},
        follow_redirects=False,
    )
    assert response.status_code == 303 and store.get(failed).state == State.QUEUED


def test_a_bearer_token_acts_without_a_form_token(client, node):
    """A browser never attaches a bearer token by itself, so there is no forgery to fear."""
    _, store = node
    failed = job_id(store, FAILED_SERIES)
    response = client.post(f"/jobs/{failed}/retry", headers=BEARER, data={}, follow_redirects=False)
    assert response.status_code == 303 and store.get(failed).state == State.QUEUED


def test_resend_sends_the_existing_result_again(client, node):
    _, store = node
    done = job_id(store, DONE_SERIES)
    page = client.get(f"/jobs/{done}", headers=basic()).text
    assert 'id="resend"' in page and '<option value="pacs">' in page
    response = client.post(
        f"/jobs/{done}/resend", headers=basic(), data={"csrf": csrf_of(page), "destination": "pacs"},
        follow_redirects=False,
    )  # fmt: skip
    assert response.status_code == 303
    assert store.get(done).state == State.SENDING
    assert [(d.destination, d.state) for d in store.deliveries(done)] == [("pacs", "pending")]


def test_resend_refuses_an_unknown_destination_and_a_job_without_result(client, node):
    _, store = node
    done, failed = job_id(store, DONE_SERIES), job_id(store, FAILED_SERIES)
    unknown = client.post(f"/jobs/{done}/resend", headers=BEARER, data={"destination": "elsewhere"})
    assert unknown.status_code == 400 and "configured: pacs" in unknown.text
    assert store.get(done).state == State.DONE
    no_result = client.post(f"/jobs/{failed}/resend", headers=BEARER, data={})
    assert no_result.status_code == 409 and "retry processes it" in no_result.text


def test_actions_take_only_an_html_form(client, node):
    _, store = node
    failed = job_id(store, FAILED_SERIES)
    response = client.post(f"/jobs/{failed}/retry", headers=BEARER, json={"csrf": "x"})
    assert response.status_code == 415 and store.get(failed).state == State.FAILED


def test_actions_are_not_reachable_by_get(client, node):
    _, store = node
    assert client.get(f"/jobs/{job_id(store, FAILED_SERIES)}/retry", headers=BEARER).status_code == 405


def test_the_authenticator_reads_its_credentials_from_a_file_or_the_environment(tmp_path, node, monkeypatch):
    from ctp_node.web.auth import WebConfigError

    settings, _ = node
    monkeypatch.setenv("PAGE_TOKEN", TOKEN)
    from_env = settings.web.model_copy(update={"token": Credential(env="PAGE_TOKEN")})
    assert Authenticator.from_settings(from_env).authenticate(f"Bearer {TOKEN}").name == "token"
    for credential, message in [
        (Credential(file=tmp_path / "absent"), "cannot read the secret file"),
        (Credential(env="UNSET_PAGE_TOKEN"), "the secret is empty"),
    ]:
        with pytest.raises(WebConfigError, match=f"web.token: {message}"):
            Authenticator.from_settings(settings.web.model_copy(update={"token": credential}))
    monkeypatch.setenv("PAGE_TOKEN", "too short")
    with pytest.raises(WebConfigError, match="at least 16"):
        Authenticator.from_settings(from_env)


def test_stow_rs_is_served_behind_the_pages_authentication_when_enabled(tmp_path):
    from ctp_node.node.receive.receiver import Receiver

    settings, store = make_node(tmp_path)
    settings = settings.model_copy(update={"dicomweb": settings.dicomweb.model_copy(update={"stow_enabled": True})})
    with TestClient(create_app(settings, store, receiver=Receiver(settings, store))) as c:
        assert c.post("/dicomweb/studies", content=b"x").status_code == 401
        refused = c.post("/dicomweb/studies", content=b"x", headers={**BEARER, "Content-Type": "text/plain"})
        assert refused.status_code == 415  # reached the STOW-RS router, which wants multipart/related
    with TestClient(create_app(settings_for(tmp_path / "off"), store)) as c:  # not enabled: not there
        assert c.post("/dicomweb/studies", content=b"x", headers=BEARER).status_code == 404


def test_text_from_the_job_store_and_headers_is_escaped(client, node):
    from sqlalchemy import update

    from ctp_node.node.shared.job_tables import series_table

    _, store = node
    failed = job_id(store, FAILED_SERIES)
    with store.engine.begin() as conn:
        conn.execute(
            update(series_table).where(series_table.c.id == failed).values(error="<img src=x onerror=alert(1)>")
        )
    for path in ("/", f"/jobs/{failed}"):
        page = client.get(path, headers=basic()).text
        assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page


def test_pages_say_when_the_job_store_does_not_answer(node, monkeypatch):
    from sqlalchemy.exc import OperationalError

    settings, store = node

    def down(*args, **kwargs):
        raise OperationalError("SELECT", {}, Exception("database is locked"))

    monkeypatch.setattr("ctp_node.node.shared.jobs_read.JobQueries.rows", down)
    with TestClient(create_app(settings, store)) as c:
        page = c.get("/", headers={**BEARER, "Accept": "text/html"})
    assert page.status_code == 503 and "job store does not answer" in page.text
    assert page.headers["x-frame-options"] == "DENY"


def test_the_job_page_shows_the_motion_record_when_there_is_one(client, node):
    from ctp_node.series.motion import MOTION_FILE

    _, store = node
    done = job_id(store, DONE_SERIES)
    assert "<h2>Motion</h2>" not in client.get(f"/jobs/{done}", headers=basic()).text  # none written
    record = {
        "corrected": 1, "unusable": [3], "centre_mm": [0, 0, 0], "seconds": {}, "notes": [],
        "volumes": [
            {"volume": 2, "time_s": 8.0, "displacement_mm": 2.4, "corrected": True, "residual_mm": 0.2, "reasons": []},
            {"volume": 3, "time_s": 12.0, "displacement_mm": 0.1, "corrected": False, "residual_mm": 2.9,
             "reasons": ["slice discontinuity (intra-volume motion)"]},
        ],
    }  # fmt: skip
    (Path(store.get(done).result_dir) / MOTION_FILE).write_text(json.dumps(record))
    page = client.get(f"/jobs/{done}", headers=basic()).text
    assert "<h2>Motion</h2>" in page and "1 of 2 volumes realigned" in page
    assert "volumes 3" in page and "slice discontinuity (intra-volume motion)" in page


def test_the_job_page_shows_the_lesion_volumes_reported_and_withheld(client, node):
    from ctp_node.series.pipeline import VOLUMES_FILE

    _, store = node
    done = job_id(store, DONE_SERIES)
    assert "<h2>Lesion volumes</h2>" not in client.get(f"/jobs/{done}", headers=basic()).text  # none written
    reason = "acquired every 8.0 s during the bolus; Tmax needs samples at most 2 s apart"
    record = {
        "synthetic 1 s": {"acquired_interval_s": 8.0, "mismatch_ratio": None, "volumes": {
            "core": {"measured_ml": 41.2, "mirror_ml": 0.0, "reported": True, "withheld": None},
            "tmax6": {"measured_ml": 39.0, "mirror_ml": 0.0, "reported": False, "withheld": reason},
        }},
    }  # fmt: skip
    (Path(store.get(done).result_dir) / VOLUMES_FILE).write_text(json.dumps(record))
    page = client.get(f"/jobs/{done}", headers=basic()).text
    assert "<h2>Lesion volumes</h2>" in page and "41.2 mL" in page
    assert "withheld" in page and "Tmax needs samples at most 2 s apart" in page
    assert "39.0" not in page  # a withheld number is not shown as if it were reported


@pytest.mark.parametrize("job", ["99999999999999999999", "9223372036854775808", "0", "-1"])
@pytest.mark.parametrize("path", ["/jobs/{}", "/jobs/{}/figures/qa/curves.png"])
def test_a_job_id_no_job_can_have_is_404_with_the_security_headers(node, job, path):
    """Issue 23 item 10: /jobs/99999999999999999999 overflowed SQLite's integer: HTTP 500, no security headers."""
    settings, store = node
    with TestClient(create_app(settings, store), raise_server_exceptions=False) as c:
        response = c.get(path.format(job), headers=basic())
        assert c.post(f"/jobs/{job}/retry", headers=BEARER, data={}).status_code == 404
    assert response.status_code == 404 and f"there is no job {job}" in response.json()["detail"]
    assert response.headers["x-frame-options"] == "DENY"


def test_an_unexpected_error_is_a_500_page_with_the_security_headers(node, monkeypatch, caplog):
    settings, store = node

    def broken(*args, **kwargs):
        raise RuntimeError("secret detail of a bug")

    monkeypatch.setattr("ctp_node.node.shared.jobs_read.JobQueries.rows", broken)
    with TestClient(create_app(settings, store), raise_server_exceptions=False) as c:
        response = c.get("/", headers=basic())
    assert response.status_code == 500 and "secret detail" not in response.text
    assert response.headers["x-frame-options"] == "DENY" and response.headers["cache-control"] == "no-store"
    assert "secret detail of a bug" in caplog.text  # the log has it, with its traceback


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_repeated_wrong_passwords_lock_the_client_out_until_the_cooldown(node):
    settings, store = node
    clock = Clock()
    auth = Authenticator.from_settings(settings.web, clock=clock)
    with TestClient(create_app(settings, store, authenticator=auth)) as c:
        statuses = [c.get("/", headers=basic(password=f"guess {i}")).status_code for i in range(20)]
        assert statuses[0] == 401 and statuses[-1] == 429
        refused = c.get("/", headers=basic())  # the right password, at once: refused all the same
        assert refused.status_code == 429
        retry_after = int(refused.headers["retry-after"])
        assert 0 < retry_after <= 3600
        clock.now += retry_after - 1
        assert c.get("/", headers=basic()).status_code == 429  # not yet
        clock.now += 2
        assert c.get("/", headers=basic()).status_code == 200  # the cooldown is over
