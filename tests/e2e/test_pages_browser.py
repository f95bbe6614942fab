"""The month report and a statement opened in a real headless browser (Debian's `chromium`
driven by `chromedriver` through Selenium): the pages render with their charts, the
screenshot is not blank, and nothing is fetched from outside the file."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from process_runs import run_process
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from billing_jobs.rules.money import UNITS_PER_CREDIT

pytestmark = pytest.mark.slow

MONTH = "2026-10"
ACCOUNT = "acct-0001"


def _browser_paths() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    assert browser, "install Debian's chromium (.ci/run does)"
    assert driver, "install Debian's chromium-driver (.ci/run does)"
    return browser, driver


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small demo platform, two closed months, the report and a statement as files."""
    where = tmp_path_factory.mktemp("pages")
    db_url = f"sqlite:///{where / 'demo.db'}"
    for args in (
        ("demo", "--accounts", "6", "--as-of", "2026-10-31", "--bare"),
        ("month-end", "--month", "2026-09"),
        ("month-end", "--month", MONTH),
        ("report", "--month", MONTH, "--output", str(where / "report.html")),
        ("statement", "--account", ACCOUNT, "--month", MONTH, "--output", str(where / "statement.html")),
        (
            "statement",
            "--account",
            ACCOUNT,
            "--month",
            MONTH,
            "--format",
            "pdf",
            "--output",
            str(where / "s.pdf"),
        ),
    ):
        result = run_process(db_url, *args, cwd=where)
        assert result.code == 0, result.stderr
    return {name: where / name for name in ("demo.db", "report.html", "statement.html", "s.pdf")}


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    binary, driver_path = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--window-size=1200,2000",
        # Any host name fails to resolve: a page that fetched from outside would show it.
        "--host-resolver-rules=MAP * ~NOTFOUND",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _requests(driver: webdriver.Chrome) -> list[str]:
    """URLs the page asked for, from Chrome's performance (DevTools network) log."""
    urls = []
    for entry in driver.get_log("performance"):
        message: dict[str, Any] = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(str(message["params"]["request"]["url"]))
    return urls


def _open(driver: webdriver.Chrome, page: Path) -> None:
    driver.get_log("performance")  # drop what earlier pages logged
    driver.get(page.as_uri())
    assert driver.execute_script("return document.readyState") == "complete"


def _stays_in_the_file(driver: webdriver.Chrome, page: Path) -> None:
    requested = _requests(driver)
    assert page.as_uri() in requested
    assert all(u.startswith(("file:", "data:")) for u in requested), requested
    resources = driver.execute_script(
        "return performance.getEntriesByType('resource').map(function (e) { return e.name; })"
    )
    assert all(str(u).startswith(("file:", "data:")) for u in resources), resources


def _not_blank(driver: webdriver.Chrome) -> Image.Image:
    shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    colours = shot.getcolors(maxcolors=1 << 20)
    assert colours is not None
    assert len(colours) > 20, f"only {len(colours)} colours: a blank or nearly blank page"
    white = max(colours)[1]
    assert max(colours)[0] < 0.97 * shot.width * shot.height, f"{white} covers almost the whole page"
    return shot


def test_the_report_renders_its_charts_offline(browser: webdriver.Chrome, pages: dict[str, Path]) -> None:
    _open(browser, pages["report.html"])
    assert browser.title == f"Billing report {MONTH}"
    charts = browser.find_elements(By.CSS_SELECTOR, ".chart svg")
    assert len(charts) == 4
    for chart in charts:
        assert chart.size["width"] > 200
        assert chart.size["height"] > 100
        assert chart.find_elements(By.CSS_SELECTOR, "path"), "a chart without drawn shapes"
        assert chart.find_elements(By.CSS_SELECTOR, "text"), "a chart without text"
    titles = [t.text for t in browser.find_elements(By.CSS_SELECTOR, ".chart svg text")]
    assert "Fees by line type" in titles
    assert "Credits funded and drawn" in titles
    lines = browser.find_elements(By.CSS_SELECTOR, "#line-totals tr[data-line-type]")
    assert [r.get_attribute("data-line-type") for r in lines][:1] == ["storage_fee"]
    assert browser.find_element(By.ID, "total-invoiced").text.strip()
    _not_blank(browser)
    _stays_in_the_file(browser, pages["report.html"])


def test_a_statement_renders_offline(browser: webdriver.Chrome, pages: dict[str, Path]) -> None:
    _open(browser, pages["statement.html"])
    assert browser.title == f"Statement {ACCOUNT} {MONTH}"
    assert browser.find_elements(By.CSS_SELECTOR, "#projects tr td code")
    assert browser.find_element(By.ID, "statement-total").get_attribute("data-units")
    assert browser.find_element(By.ID, "credits").is_displayed()
    _not_blank(browser)
    _stays_in_the_file(browser, pages["statement.html"])


def test_the_statement_prints_to_pdf(pages: dict[str, Path]) -> None:
    data = pages["s.pdf"].read_bytes()
    assert data.startswith(b"%PDF-")
    assert b"/Type /Page" in data or b"/Type/Page" in data


def test_the_demo_statement_and_report_add_up_to_the_export(pages: dict[str, Path]) -> None:
    db = pages["demo.db"]
    result = run_process(f"sqlite:///{db}", "export", "--month", MONTH, cwd=db.parent)
    assert result.code == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    account = sum(Decimal(r["amount"]) for r in rows if r["account_id"] == ACCOUNT)
    assert account > 0

    statement = pages["statement.html"].read_text(encoding="utf-8")
    found = re.search(r'id="statement-total" data-units="(-?\d+)"', statement)
    assert found
    assert Decimal(found.group(1)) / UNITS_PER_CREDIT == account

    report = pages["report.html"].read_text(encoding="utf-8")
    total = re.search(r'<tr class="total"><td>total</td>.*?data-units="(-?\d+)"', report, re.S)
    assert total
    assert Decimal(total.group(1)) / UNITS_PER_CREDIT == sum(Decimal(r["amount"]) for r in rows)
