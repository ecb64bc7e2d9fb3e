"""The tiny DAG's report opened in headless Chromium (Debian's ``chromium`` and ``chromium-driver``).

Checks what a reader sees, not the HTML text: every image has loaded (natural width > 0),
every section, table and figure caption is there, the contents links land on sections, and
the page fetched nothing but ``file://`` URLs (it must work offline on a cluster login node).
Without Chromium or selenium the tests skip, and fail instead under CONFRANK_REQUIRE_BROWSER=1
(``.ci/run`` installs Chromium and sets it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from stages.common import ROOT
from tests.test_dag import snakemake
from tests.test_report import synthetic_deltas

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("dag")]

SECTIONS = ["Results (AP %, time per image)", "Rank against multi-scale", "AP by face attribute",
            "Examples: where re-ranking changed the most", "PR curves", "Confidence distributions", "Face heights",
            "Ranker training", "Provenance"]
CV_SECTION = "Cross-validation of ranker variants (ΔAP)"


def need_browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths; skip when missing, fail under CONFRANK_REQUIRE_BROWSER=1."""
    found = (shutil.which("chromium"), shutil.which("chromedriver"))
    try:
        import selenium  # noqa: F401
    except ImportError:
        found = (None, None)
    if None in found:
        reason = "headless browser not found: needs chromium, chromium-driver (apt-get) and selenium (pip)"
        if os.environ.get("CONFRANK_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + " (CONFRANK_REQUIRE_BROWSER=1)")
        pytest.skip(reason)
    return found  # type: ignore[return-value]


@pytest.fixture(scope="module")
def driver() -> Iterator:
    """Headless Chromium with its network log on and every host name unresolvable."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = need_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000",
                "--host-resolver-rules=MAP * ~NOTFOUND"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    browser = webdriver.Chrome(service=Service(chromedriver), options=options)
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def reports(driver, tmp_path_factory) -> dict[str, Path]:
    """The tiny DAG's report, and a second one of the same data folder with cross-validation deltas."""
    from stages.cli import main

    work = tmp_path_factory.mktemp("tiny")
    shutil.copy(ROOT / "config" / "test.yaml", work / "config.yaml")
    out = snakemake(work, "--cores", "2", check=False)
    assert "steps (100%) done" in out, out[-4000:]
    data = work / "data"
    deltas = data / "processed" / "cv" / "cv3" / "deltas.parquet"
    deltas.parent.mkdir(parents=True)
    synthetic_deltas().to_parquet(deltas)
    try:
        main(["report", "--out", str(work / "report_cv"), "--data-dir", str(data)])
    except SystemExit as exc:
        assert not exc.code
    return {"dag": data / "processed" / "report" / "report.html", "cv": work / "report_cv" / "report.html"}


def open_page(driver, page: Path) -> dict:
    """Load ``page`` and return what the browser shows and every URL it requested."""
    driver.get_log("performance")  # drop earlier entries
    driver.get(page.as_uri())
    shown = driver.execute_script("""
        const text = sel => [...document.querySelectorAll(sel)].map(e => e.textContent.trim());
        return {
          ready: document.readyState,
          images: [...document.images].map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]),
          sections: text('h2'),
          tables: document.querySelectorAll('table').length,
          figures: document.querySelectorAll('figure').length,
          captions: text('figure figcaption'),
          links: [...document.querySelectorAll('nav a')].map(a => !!document.getElementById(a.hash.slice(1))),
        };""")
    shown["requests"] = [json.loads(e["message"])["message"]["params"]["request"]["url"]
                         for e in driver.get_log("performance")
                         if json.loads(e["message"])["message"]["method"] == "Network.requestWillBeSent"]
    return shown


def test_tiny_dag_report_in_chromium(driver, reports):
    page = reports["dag"]
    shown = open_page(driver, page)
    assert shown["ready"] == "complete"
    assert shown["sections"] == SECTIONS
    on_disk = sorted(f"figures/{p.name}" for p in (page.parent / "figures").glob("*.png"))
    assert sorted(src for src, _, _ in shown["images"]) == on_disk and len(on_disk) >= 5
    assert [src for src, complete, width in shown["images"] if not complete or width <= 0] == []
    # results, attributes, provenance (rank against multi: no multi in the tiny DAG, shown as "no results")
    assert shown["tables"] == 3
    assert shown["figures"] == len(on_disk)
    assert all(re.search(r"[Ff]rom (processed|interim)/", c) for c in shown["captions"]), shown["captions"]
    assert shown["links"] == [True] * len(SECTIONS)
    assert [u for u in shown["requests"] if not u.startswith("file://")] == []
    assert page.as_uri() in shown["requests"] and len(shown["requests"]) == 1 + len(on_disk)


def test_cross_validation_section_in_chromium(driver, reports):
    shown = open_page(driver, reports["cv"])
    assert shown["sections"] == SECTIONS[:3] + [CV_SECTION] + SECTIONS[3:]
    assert shown["tables"] == 4
    assert "figures/cv_cv3.png" in [src for src, _, _ in shown["images"]]
    assert [src for src, complete, width in shown["images"] if not complete or width <= 0] == []
    assert [u for u in shown["requests"] if not u.startswith("file://")] == []
