"""Headless Chromium for the browser tests (Debian's `chromium` + `chromium-driver`, driven by selenium).

`.ci/run` installs both when missing, so CI runs these tests; elsewhere they skip saying what is missing."""

import shutil

import pytest


def chromium_driver(width=1280, height=900):
    """A headless Chrome webdriver, or a pytest skip naming what is missing."""
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    if missing:
        pytest.skip(f"browser test: {' and '.join(missing)} not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--lang=en-US"):
        opts.add_argument(arg)
    opts.add_argument(f"--window-size={width},{height}")
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


@pytest.fixture
def browser():
    """A headless Chromium page for one test (quit afterwards)."""
    driver = chromium_driver()
    yield driver
    driver.quit()
