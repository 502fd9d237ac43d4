"""What the status page shows in a real browser (issue 25): distinct state badges, dates on one line,
progress while processing, a QA figure large enough to read and linked to its full size, an error page
instead of raw JSON. Debian's chromium driven by selenium, headless (conftest.py's ``browser``).
"""

from __future__ import annotations

from urllib.parse import quote

import pytest

from ctp_node.web import start_web
from tests.web.helpers import PASSWORD, PROCESSING_SERIES, RETRIED_SERIES, USER, job_id, make_retried_node


@pytest.fixture()
def page(tmp_path, browser):
    settings, store = make_retried_node(tmp_path / "data")
    server = start_web(settings, store, port=0)
    base = f"http://{USER}:{quote(PASSWORD, safe='')}@{server.host}:{server.port}"
    try:
        yield browser, base, store
    finally:
        server.stop()


def _line_height(element) -> float:
    value = element.value_of_css_property("line-height")
    if value.endswith("px"):
        return float(value[:-2])
    return 1.45 * float(element.value_of_css_property("font-size")[:-2])


def test_the_job_list_tells_states_apart_keeps_dates_on_one_line_and_shows_progress(page):
    from selenium.webdriver.common.by import By

    browser, base, store = page
    browser.set_window_size(1280, 900)  # a laptop: the 14 columns have to share the width
    browser.get(base + "/")
    colours = {}
    for state in ("receiving", "queued", "processing", "sending", "done", "failed", "ignored"):
        badge = browser.find_element(By.CSS_SELECTOR, f"nav.states .badge.{state}")
        assert badge.text == state  # the state in words, not in colour alone
        colours[state] = badge.value_of_css_property("background-color")
    assert len(set(colours.values())) == len(colours), f"states share a colour: {colours}"

    first_row = browser.find_elements(By.CSS_SELECTOR, "table.jobs tbody tr")[0]
    for time in first_row.find_elements(By.CSS_SELECTOR, "td.time time"):
        # "2026-12-07 05:26:24" and "2026-01-01" wrapped onto two or three lines.
        assert time.size["height"] < 1.5 * _line_height(time), f"{time.text!r} wraps: {time.size}"
    assert "2026-01-01" in first_row.text and "20260101" not in browser.page_source

    processing = job_id(store, PROCESSING_SERIES)
    row = browser.find_element(By.XPATH, f"//a[@class='job-link' and text()='{processing}']/ancestor::tr")
    assert "42 %" in row.find_element(By.CSS_SELECTOR, "td.progress").text


def test_a_processing_job_shows_its_progress_bar_and_eta(page):
    from selenium.webdriver.common.by import By

    browser, base, store = page
    browser.get(f"{base}/jobs/{job_id(store, PROCESSING_SERIES)}")
    bar = browser.find_element(By.TAG_NAME, "progress")
    assert bar.get_attribute("value") == "42" and bar.get_attribute("max") == "100"
    assert "ETA" in bar.find_element(By.XPATH, "..").text
    refresh = browser.find_element(By.CSS_SELECTOR, 'meta[http-equiv="refresh"]').get_attribute("content")
    assert int(refresh) <= 10


def test_the_qa_figure_is_large_enough_to_read_and_links_to_its_full_size(page):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, base, store = page
    retried = job_id(store, RETRIED_SERIES)
    browser.set_window_size(1400, 1100)
    browser.get(f"{base}/jobs/{retried}")
    figure = browser.find_element(By.CSS_SELECTOR, ".figures img[alt='qa_report.png']")
    WebDriverWait(browser, 20).until(lambda _: int(figure.get_property("naturalWidth") or 0) > 0)
    assert figure.get_property("naturalWidth") == 1800
    viewport = browser.execute_script("return document.documentElement.clientWidth")
    assert figure.size["width"] >= 0.85 * viewport, f"shown {figure.size['width']} px wide in {viewport}"
    link = figure.find_element(By.XPATH, "ancestor::a")
    assert link.get_attribute("href").endswith(f"/jobs/{retried}/figures/qa_report.png")

    browser.set_window_size(600, 900)  # a narrow window: the figure shrinks with it (the wide tables may scroll)
    width = browser.execute_script("return document.documentElement.clientWidth")
    assert figure.location["x"] + figure.size["width"] <= width, (figure.location, figure.size, width)

    link.click()  # full size: the PNG itself
    WebDriverWait(browser, 20).until(lambda b: b.current_url.endswith("qa_report.png"))


def test_the_job_page_says_what_was_not_measured_and_that_nothing_moved(page):
    from selenium.webdriver.common.by import By

    browser, base, store = page
    browser.get(f"{base}/jobs/{job_id(store, RETRIED_SERIES)}")
    row = browser.find_element(By.XPATH, "//td[text()='csf offset']/ancestor::tr")
    cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
    assert cells[3] == "not measured" and "yes" not in cells
    motion = browser.find_element(By.XPATH, "//h2[text()='Motion']/ancestor::section")
    assert "No motion detected" in motion.text and not motion.find_elements(By.TAG_NAME, "table")
    deliveries = browser.find_element(By.XPATH, "//h2[text()='Deliveries']/ancestor::section")
    assert "Connection refused (1)" in deliveries.text and "Connection refused (2)" in deliveries.text


def test_an_error_in_the_browser_is_a_page_not_json(page):
    from selenium.webdriver.common.by import By

    browser, base, _ = page
    browser.get(f"{base}/jobs/not-a-number")  # the browser's own Accept header
    assert browser.find_element(By.TAG_NAME, "h1").text == "422"
    assert '"detail"' not in browser.page_source and "back to the job list" in browser.page_source
