"""Fixtures of the `longlive-triton` command tests: one CPU thread, and a headless chromium driven by selenium.

The browser is Debian's chromium with its chromedriver (`apt-get install -y chromium chromium-driver`;
.ci/run installs them). Where either is missing, the browser tests are skipped and say why.
"""
from __future__ import annotations

import shutil

import pytest

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1000,1400")


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    """A headless chromium under selenium (skipped, with the reason, where there is none)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("no headless browser: install Debian's chromium and chromium-driver "
                    "(apt-get install -y chromium chromium-driver) to run the browser tests")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    # An explicit chromedriver: selenium then never tries to download one.
    drv = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    yield drv
    drv.quit()
