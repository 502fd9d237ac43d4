"""The status page as an operator reads it (issue 25): attempts and next attempts that say what happens,
delivery errors kept, every output series, progress while processing, readable dates, errors as pages
for a browser and JSON for a script, HEAD, a favicon. What the page looks like: test_browser_for_operators.py.
"""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from ctp_node.web import create_app
from ctp_node.web.app import _fmt_dicom_date, _fmt_dicom_time, wants_html
from tests.web.helpers import (
    BEARER,
    DONE_SERIES,
    NOT_MEASURED,
    OUTPUT_SERIES,
    PROCESSING_SERIES,
    QUEUED_SERIES,
    RETRIED_SERIES,
    basic,
    job_id,
    make_retried_node,
)

BROWSER = {**basic(), "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,*/*;q=0.8"}


@pytest.fixture()
def retried(tmp_path):
    settings, store = make_retried_node(tmp_path / "data")
    with TestClient(create_app(settings, store), raise_server_exceptions=False) as c:
        yield c, store


def _row(page: str, label: str) -> str:
    match = re.search(rf"<tr><th>{label}</th><td[^>]*>(.*?)</td></tr>", page, re.S)
    assert match, f"no {label!r} row"
    return re.sub(r"<[^>]+>", "", match.group(1)).strip()


def _section(page: str, title: str) -> str:
    start = page.index(f"<h2>{title}")
    return page[start : page.find("</section>", start)]


def test_a_done_job_shows_its_processing_attempts_and_no_next_attempt(retried):
    c, store = retried
    first_try = c.get(f"/jobs/{job_id(store, DONE_SERIES)}", headers=basic()).text
    assert _row(first_try, "processing attempts") == "1"  # was "attempts 0"
    page = c.get(f"/jobs/{job_id(store, RETRIED_SERIES)}", headers=basic()).text
    assert _row(page, "processing attempts") == "3"  # two full disks, then the result
    assert "next" not in _row(page, "processing attempts")


def test_a_delivery_sent_after_retries_keeps_its_errors_and_shows_no_next_attempt(retried):
    c, store = retried
    deliveries = _section(c.get(f"/jobs/{job_id(store, RETRIED_SERIES)}", headers=basic()).text, "Deliveries")
    cells = re.findall(r"<td[^>]*>(.*?)</td>", deliveries, re.S)
    assert "sent" in cells[2] and cells[3] == "3"
    assert "<time>" not in cells[5], "a sent delivery showed a next-attempt time"
    # The earlier errors, oldest first, with their attempt numbers.
    assert re.search(r"attempt 1: .*Connection refused \(1\).*attempt 2: .*Connection refused \(2\)", cells[6], re.S)


def test_every_output_series_is_listed_with_its_description_and_instances(retried):
    c, store = retried
    outputs = _section(c.get(f"/jobs/{job_id(store, RETRIED_SERIES)}", headers=basic()).text, "Output series")
    assert "1s SYNTHETIC - RESEARCH USE ONLY" in outputs
    for description, count in OUTPUT_SERIES.values():
        assert re.search(rf"<td>{re.escape(description)}</td>.*?<td class=\"num\">{count}</td>", outputs, re.S), (
            description
        )
    assert f"{1 + len(OUTPUT_SERIES)} series, {3 + sum(n for _, n in OUTPUT_SERIES.values())} instances" in outputs


def test_a_check_not_measured_is_not_passed_and_no_motion_says_so(retried):
    c, store = retried
    page = c.get(f"/jobs/{job_id(store, RETRIED_SERIES)}", headers=basic()).text
    row = re.search(r"<tr><td>csf offset</td>(.*?)</tr>", _section(page, "Guardrail"), re.S).group(1)
    cells = [re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
    assert cells[2] == "not measured" and "yes" not in cells, cells
    assert NOT_MEASURED in row
    motion = _section(page, "Motion")
    assert "No motion detected" in motion and "<table" not in motion  # not an empty table


def test_the_qa_figure_links_to_its_full_size(retried):
    c, store = retried
    retried_id = job_id(store, RETRIED_SERIES)
    page = c.get(f"/jobs/{retried_id}", headers=basic()).text
    url = f"/jobs/{retried_id}/figures/qa_report.png"
    assert re.search(rf'<a href="{url}"[^>]*><img src="{url}"', page)


def test_a_processing_job_shows_progress_and_eta_and_its_pages_refresh(retried):
    c, store = retried
    processing = job_id(store, PROCESSING_SERIES)
    page = c.get(f"/jobs/{processing}", headers=basic()).text
    progress = _row(page, "progress")
    assert "42 %" in progress and "42 of 100" in progress and "ETA" in progress
    assert re.search(r"about 2 min \d\d s left", progress), progress
    assert '<meta http-equiv="refresh" content="5">' in page
    listing = c.get("/", headers=basic()).text
    assert re.search(r'class="progress">42 %, about 2 min', listing)
    assert '<meta http-equiv="refresh" content="10">' in listing  # faster while a job is processed
    done = c.get(f"/jobs/{job_id(store, DONE_SERIES)}", headers=basic()).text
    assert 'http-equiv="refresh"' not in done  # nothing changes on a finished job
    queued = c.get(f"/jobs/{job_id(store, QUEUED_SERIES)}", headers=basic()).text
    assert 'http-equiv="refresh"' in queued and "<th>progress</th>" not in queued


def test_study_dates_and_times_are_formatted():
    assert _fmt_dicom_date("20000101") == "2000-01-01" and _fmt_dicom_date("2000.01.01") == "2000.01.01"
    assert _fmt_dicom_time("143005.123456") == "14:30:05" and _fmt_dicom_time("1430") == "14:30:00"
    assert _fmt_dicom_time("14") == "14" and _fmt_dicom_time("") == "" and _fmt_dicom_time("garbage") == "garbage"


def test_the_pages_show_the_study_date_as_a_date(retried):
    c, store = retried
    for path in ("/", f"/jobs/{job_id(store, DONE_SERIES)}"):
        page = c.get(path, headers=basic()).text
        assert "2026-01-01" in page and "20260101" not in page


@pytest.mark.parametrize(
    "accept, html",
    [
        ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", True),  # a browser
        ("application/xhtml+xml", True),
        ("*/*", False),  # curl
        ("", False),
        ("application/json", False),
        ("application/dicom+json", False),  # a DICOMweb client
        ("application/json, text/html;q=0.5", False),
        ("text/html;q=0", False),
    ],
)
def test_accept_headers_that_want_a_page(accept, html):
    assert wants_html(accept) is html


def test_errors_are_pages_for_a_browser_and_json_for_a_script(retried):
    c, store = retried
    bad = c.get("/jobs/abc", headers=BROWSER)
    assert bad.status_code == 422 and bad.headers["content-type"].startswith("text/html")
    assert "<h1>422</h1>" in bad.text and "job_id" in bad.text and '"detail"' not in bad.text
    assert c.get("/jobs/abc", headers=basic()).json()["detail"][0]["loc"] == ["path", "job_id"]
    missing = c.get("/nowhere", headers=BROWSER)
    assert missing.status_code == 404 and missing.headers["content-type"].startswith("text/html")
    login = c.get("/", headers={"Accept": BROWSER["Accept"]})  # shown once the login dialog is cancelled
    assert login.status_code == 401 and login.headers["www-authenticate"].startswith("Basic ")
    assert login.headers["content-type"].startswith("text/html") and "authentication required" in login.text
    assert c.get("/", headers={"Accept": "application/json"}).text == "authentication required"


def test_an_unexpected_error_is_a_page_for_a_browser(retried, monkeypatch):
    c, _ = retried

    def broken(*args, **kwargs):
        raise RuntimeError("secret detail of a bug")

    monkeypatch.setattr("ctp_node.node.shared.jobs_read.JobQueries.rows", broken)
    page = c.get("/", headers=BROWSER)
    assert page.status_code == 500 and page.headers["content-type"].startswith("text/html")
    assert "<h1>500</h1>" in page.text and "secret detail" not in page.text
    assert page.headers["x-frame-options"] == "DENY"
    assert c.get("/", headers=basic()).headers["content-type"].startswith("text/plain")


@pytest.mark.parametrize("path", ["/", "/jobs/1", "/jobs/1/figures/qa/curves.png", "/static/style.css", "/healthz"])
def test_head_is_answered_like_get_without_a_body(retried, path):
    c, _ = retried
    got, head = c.get(path, headers=basic()), c.head(path, headers=basic())
    assert head.status_code == got.status_code == 200
    assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"]
    assert head.headers["x-frame-options"] == "DENY"
    assert c.head(path).status_code == (200 if path == "/healthz" else 401)  # no way around authentication
    assert c.head("/jobs/1/retry", headers=BEARER).status_code == 405  # an action answers POST only


def test_the_pages_link_a_favicon_that_is_served(retried):
    c, _ = retried
    page = c.get("/", headers=basic()).text
    href = re.search(r'<link rel="icon" href="([^"]+)" type="image/svg\+xml">', page).group(1)
    for path in (href, "/favicon.ico"):
        icon = c.get(path, headers=basic())
        assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"
        assert icon.content.startswith(b"<svg") and len(icon.content) < 2048
