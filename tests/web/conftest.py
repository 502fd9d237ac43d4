"""Fixtures: a node's data folder with jobs in several states, a status page client over it, and a headless
chromium driven by selenium (``browser``)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from ctp_node.web import create_app
from ctp_node.web.auth import Authenticator
from tests.deploy.tools import need_module, need_program
from tests.web.helpers import make_node

INSTALL = "apt-get install chromium chromium-driver; pip install -e .[test]"


@pytest.fixture()
def node(tmp_path):
    return make_node(tmp_path / "data")


@pytest.fixture()
def client(node):
    settings, store = node
    with TestClient(create_app(settings, store, authenticator=Authenticator.from_settings(settings.web))) as c:
        yield c


@pytest.fixture()
def browser(tmp_path):
    need_module("selenium", INSTALL)
    chromium = need_program("chromium", INSTALL, ("/usr/bin/chromium",))
    driver_path = need_program("chromedriver", INSTALL, ("/usr/bin/chromedriver",))
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1100",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
