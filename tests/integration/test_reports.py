"""A failed guest test's evidence where people look: JUnit attachment lines, and the screen shown
inline in pytest-html's self-contained report, rendered by a real (headless) Chromium.

One inner pytest run holds a test that fails with its guest alive and one whose guest powers off;
the checks below read that run's JUnit XML and open its HTML report in Chromium.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pytest_vmfixtures.fixtures import SESSION_KEY

INNER = '''
import time


def test_fails(vm):
    vm.run("echo console-marker > /dev/ttyS0; echo journal-marker > /dev/kmsg", check=True)
    assert False, "on purpose"


def test_guest_dies(vm):
    try:
        vm.run("echo o > /proc/sysrq-trigger", timeout=60)
    finally:
        deadline = time.monotonic() + 60
        while vm.machine_alive() and time.monotonic() < deadline:
            time.sleep(0.5)
    assert False, "the guest powered off"
'''

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Where the docs' picture of a report comes from: set to a PNG path to save the rendered failure.
SCREENSHOT_ENV = "VMFX_REPORT_SCREENSHOT"


@dataclass
class Run:
    directory: Path
    junit: Path
    html: Path


@pytest.fixture(scope="module")
def failed_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The inner run, once for the module (two guest tests: one restore, one guest that powers off)."""
    directory = tmp_path_factory.mktemp("reports")
    (directory / "test_report.py").write_text(INNER)
    junit, html = directory / "junit.xml", directory / "report.html"
    cache = request.config.stash[SESSION_KEY].settings.cache_dir
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--vm-cache={cache}", f"--html={html}",
         "--self-contained-html", f"--junitxml={junit}", "test_report.py"],
        cwd=directory, capture_output=True, text=True, timeout=1800, env=env,
    )
    assert result.returncode == 1, result.stdout[-4000:] + result.stderr[-2000:]
    assert "2 failed" in result.stdout, result.stdout[-4000:]
    return Run(directory, junit, html)


def _case(run: Run, name: str) -> ET.Element:
    """The test case of ``name`` on debian-12 (unpinned tests run once per image of the matrix)."""
    cases = list(ET.parse(run.junit).iter("testcase"))
    (case,) = [c for c in cases if c.get("name") == f"{name}[debian-12]"] or [None]  # type: ignore[list-item]
    assert case is not None, f"no {name}[debian-12] in {[c.get('name') for c in cases]}"
    return case


def _attachments(case: ET.Element) -> list[Path]:
    text = "".join(e.text or "" for e in case.iter("system-out"))
    return [Path(p) for p in re.findall(r"\[\[ATTACHMENT\|(.+?)\]\]", text)]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_junit_system_out_attaches_each_evidence_file(failed_run: Run) -> None:
    files = _attachments(_case(failed_run, "test_fails"))
    assert sorted(p.name for p in files) == ["console.log", "journal.txt", "screen.png"]
    for path in files:
        assert path.is_absolute() and path.is_file(), path
        # Without --vm-artifacts the evidence lies beside the JUnit XML, where CI archives reports.
        assert path.is_relative_to(failed_run.directory / "vm-artifacts"), path
    assert "journal-marker" in next(p for p in files if p.name == "journal.txt").read_text()


def test_junit_properties_name_image_backend_and_accelerator(failed_run: Run) -> None:
    properties = {p.get("name", ""): p.get("value") for p in _case(failed_run, "test_fails").iter("property")}
    by_key = {name.rsplit(" ", 1)[-1]: value for name, value in properties.items() if name.startswith("vm debian-12-")}
    assert by_key.get("image") == "debian-12", properties
    assert by_key.get("backend") == "qemu", properties
    assert by_key.get("accelerator") in ("kvm", "tcg"), properties


def test_a_dead_guest_still_attaches_its_console_and_says_why_the_rest_is_missing(failed_run: Run) -> None:
    case = _case(failed_run, "test_guest_dies")
    assert [p.name for p in _attachments(case)] == ["console.log"]
    text = "".join(e.text or "" for e in case.iter("system-out"))
    assert "screen: not saved: the guest was no longer running" in text
    assert "journal: not saved: the guest was no longer running" in text


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        if os.environ.get("CI") == "true":
            pytest.fail("chromium and chromium-driver are not installed (scripts/bootstrap installs them)")
        pytest.skip("chromium and chromium-driver are not installed: apt install chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1500,2600",
                     f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


# Resolves with the first shown image of a test's entry once the browser has decoded it (or failed to).
IMAGE_STATE = """
const [testId, done] = arguments;
const deadline = Date.now() + 20000;
(function poll() {
  const body = document.getElementById(testId);
  const img = body && body.querySelector('.media img');
  if (img && img.getAttribute('src') && img.complete) {
    const box = img.getBoundingClientRect();
    done({width: img.naturalWidth, height: img.naturalHeight, shownWidth: box.width, shownHeight: box.height,
          src: img.getAttribute('src').slice(0, 22), text: body.innerText});
  } else if (Date.now() > deadline) {
    done({error: body ? 'no decoded image in the entry' : 'no entry ' + testId});
  } else {
    setTimeout(poll, 100);
  }
})();
"""


def test_the_self_contained_report_shows_the_guest_screen_inline(failed_run: Run, browser: Any) -> None:
    browser.get(failed_run.html.as_uri())
    state = browser.execute_async_script(IMAGE_STATE, "test_report.py::test_fails[debian-12]")
    assert "error" not in state, state
    assert state["src"].startswith("data:image/png;base64"), state["src"]  # inline: nothing beside the HTML file
    screen = next(p for p in _attachments(_case(failed_run, "test_fails")) if p.name == "screen.png")
    assert (state["width"], state["height"]) == png_size(screen)  # decoded: the guest's own screen size
    assert state["shownWidth"] > 0 and state["shownHeight"] > 0  # and laid out visibly
    assert "console-marker" in state["text"] and "journal-marker" in state["text"]
    target = os.environ.get(SCREENSHOT_ENV)
    if target:
        browser.find_element("id", "test_report.py::test_fails[debian-12]").screenshot(target)


def test_the_report_says_why_a_dead_guest_has_no_screen(failed_run: Run, browser: Any) -> None:
    browser.get(failed_run.html.as_uri())
    text = browser.execute_script("return document.getElementById(arguments[0]).innerText", "test_report.py::test_guest_dies[debian-12]")
    assert "screen: not saved: the guest was no longer running" in text
