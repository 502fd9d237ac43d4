"""The status page in a real browser: Debian's chromium driven by selenium, headless (the ``browser``
fixture of conftest.py: skipped with the install line when chromium, its driver or selenium is missing;
under CTP_NODE_DEPLOY_CHECKS=required (CI) that fails instead, tests/deploy/tools.py).
"""

from __future__ import annotations

import io
from urllib.parse import quote

import numpy as np
from PIL import Image

from ctp_node.node.shared.jobs import State
from ctp_node.web import start_web
from tests.web.helpers import DONE_SERIES, PASSWORD, USER, job_id, make_node


def test_a_processed_study_in_the_browser(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import Select, WebDriverWait

    settings, store = make_node(tmp_path / "data")
    server = start_web(settings, store, port=0)
    try:
        done = job_id(store, DONE_SERIES)
        # Basic credentials in the first address: the browser answers the page's challenge with them
        # and sends them again for the figure, the style sheet and the pages that follow.
        browser.get(f"http://{USER}:{quote(PASSWORD, safe='')}@{server.host}:{server.port}/")
        assert browser.find_element(By.TAG_NAME, "h1").text == "Series jobs"
        assert len(browser.find_elements(By.CSS_SELECTOR, "a.job-link")) == 3
        assert "DOE" not in browser.page_source  # masked

        browser.find_element(By.CSS_SELECTOR, f'a.job-link[href="/jobs/{done}"]').click()
        WebDriverWait(browser, 20).until(ready.text_to_be_present_in_element((By.TAG_NAME, "h1"), f"Job {done}"))
        figure = browser.find_element(By.CSS_SELECTOR, ".figures img")
        WebDriverWait(browser, 20).until(lambda _: int(figure.get_property("naturalWidth") or 0) > 0)
        assert figure.get_property("naturalWidth") == 200  # the QA figure, loaded with the page's credentials
        # The style sheet applied (Content-Security-Policy allows the page's own): the banner is dark.
        banner = browser.find_element(By.CSS_SELECTOR, "header.top").value_of_css_property("background-color")
        assert banner in ("rgba(32, 48, 63, 1)", "rgb(32, 48, 63)")

        screenshot = tmp_path / "job-page.png"
        png = browser.get_screenshot_as_png()
        screenshot.write_bytes(png)
        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)
        background = np.median(pixels)
        assert pixels.std() > 10, f"the screenshot looks blank (std {pixels.std():.1f}): {screenshot}"
        assert (np.abs(pixels - background) > 40).mean() > 0.02, f"too little drawn on the page: {screenshot}"

        # An action as a browser posts it (its Origin header, the page's CSRF token): accepted.
        Select(browser.find_element(By.NAME, "destination")).select_by_value("pacs")
        browser.find_element(By.ID, "resend").click()
        WebDriverWait(browser, 20).until(ready.presence_of_element_located((By.CSS_SELECTOR, "p.flash")))
        assert store.get(done).state == State.SENDING
    finally:
        server.stop()
