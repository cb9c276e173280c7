"""Evidence where people look: JUnit XML attachment lines and pytest-html extras.

A failed guest test's evidence (evidence.py) is collected in the fixture's teardown, before the
revert; the teardown report then carries it:

- a section ``Captured stdout teardown: vm NAME evidence`` with one ``[[ATTACHMENT|/absolute/path]]``
  line per saved file (the convention GitLab's test reports and Jenkins' JUnit attachments read) and a
  line for each piece that could not be saved, saying why. Being captured stdout, it reaches JUnit's
  ``system-out`` where ``junit_logging`` writes captured output; where it does not (the default,
  ``no``), :func:`write_junit_attachments` adds the ``system-out`` element itself;
- with pytest-html 4 active, ``report.extras``: the screen as an image (base64, so it shows inline
  with ``--self-contained-html`` too), the console and journal tails, and sections named ``vm …``
  that pytest-html would not show from a teardown report.

pytest-html is imported only when its plugin is active for this run.
"""

from __future__ import annotations

import base64
import html
import logging
import re
import xml.etree.ElementTree as ET
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import pytest

from .consolelog import console_tail
from .evidence import Evidence

log = logging.getLogger("pytest_vmfixtures")

SECTION_PREFIX = "Captured stdout teardown: vm "
SECTION_SUFFIX = " evidence"
MIN_PYTEST_HTML = (4, 0)
CONSOLE_LINES = 30
JOURNAL_LINES = 40
# The guest agent logs every call, the evidence's own included: the file keeps them, the report's tail does not.
AGENT_NOISE = re.compile(r"qemu-ga\[\d+\]: info: guest-(exec|exec-status|ping|sync|sync-delimited) called")
JUNIT_WRITES_STDOUT = ("system-out", "out-err", "all")  # junit_logging values that write captured stdout


def attachment_text(evidence: Evidence) -> str:
    lines = [f"[[ATTACHMENT|{path}]]" for path in evidence.paths()]
    lines += [f"{piece}: not saved: {why}" for piece, why in evidence.skipped.items()]
    return "\n".join(lines) + "\n"


def add_sections(report: pytest.TestReport, evidence: list[Evidence]) -> None:
    for each in evidence:
        report.sections.append((f"{SECTION_PREFIX}{each.guest}{SECTION_SUFFIX}", attachment_text(each)))


def attachment_sections(report: pytest.TestReport) -> list[str]:
    """The evidence sections a teardown report carries (also after xdist sent it to the controller)."""
    return [text for header, text in report.sections if header.startswith(SECTION_PREFIX) and header.endswith(SECTION_SUFFIX)]


def _junit_xml(config: pytest.Config) -> Any:
    try:
        from _pytest.junitxml import xml_key  # pytest's own key for its LogXML; no public way to reach it
    except ImportError:
        return None
    return config.stash.get(xml_key, None)


class JunitAttachments:
    """Where ``junit_logging`` leaves captured stdout out of the XML, write the attachment lines to system-out."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    @pytest.hookimpl(tryfirst=True)  # before junitxml closes the test case
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "teardown":
            return
        texts = attachment_sections(report)
        if not texts or str(self.config.getini("junit_logging")) in JUNIT_WRITES_STDOUT:
            return
        xml = _junit_xml(self.config)
        if xml is None:
            return
        element = ET.Element("system-out")
        element.text = "".join(texts)
        xml.node_reporter(report).append(element)


def html_plugin_state(config: pytest.Config) -> str | None:
    """None when pytest-html's report is on and new enough; else why its extras are not added ("" if not asked)."""
    if not config.pluginmanager.hasplugin("html") or not config.getoption("htmlpath", None):
        return ""
    try:
        found = version("pytest-html")
    except PackageNotFoundError:
        return None
    parts = tuple(int(p) for p in found.split(".")[:2] if p.isdigit())
    if parts < MIN_PYTEST_HTML:
        return (f"pytest-html {found} is older than 4.0: failed guest tests' screen, console and journal are not in "
                "the HTML report; pip install 'pytest-html>=4'")
    return None


def journal_lines(text: str) -> list[str]:
    """The journal's lines without the agent's call log (a dropped entry's indented continuation lines go too)."""
    kept: list[str] = []
    dropping = False
    for line in text.splitlines():
        if line[:1].isspace() and dropping:
            continue
        dropping = bool(AGENT_NOISE.search(line))
        if not dropping:
            kept.append(line)
    return kept


def _evidence_html(each: Evidence) -> str:
    parts = [f"<h4>vm {html.escape(each.guest)} ({html.escape(each.image)}, {html.escape(each.accel)})</h4>"]
    console = each.files.get("console")
    if console is not None:
        parts.append(f"<p>console, last {CONSOLE_LINES} lines</p><pre>{html.escape(console_tail(console, CONSOLE_LINES))}</pre>")
    journal = each.files.get("journal")
    if journal is not None:
        text = "\n".join(journal_lines(journal.read_text(errors="replace"))[-JOURNAL_LINES:])
        parts.append(f"<p>journal, last {JOURNAL_LINES} lines (without the guest agent's call log)</p><pre>{html.escape(text)}</pre>")
    for piece, why in each.skipped.items():
        parts.append(f"<p>{html.escape(piece)}: not saved: {html.escape(why)}</p>")
    return "\n".join(parts)


def add_html_extras(report: pytest.TestReport, evidence: list[Evidence]) -> None:
    """Put the screen, the console and journal tails and teardown's ``vm …`` sections into pytest-html's entry."""
    from pytest_html import extras  # only called when the html plugin is active

    added: list[Any] = []
    for each in evidence:
        screen = each.files.get("screen")
        if screen is not None:
            data = base64.b64encode(screen.read_bytes()).decode("ascii")
            added.append(extras.png(data, name=f"vm {each.guest} screen"))
        added.append(extras.html(_evidence_html(each)))
    for header, text in report.sections:
        if header.startswith("vm "):  # a teardown report's own sections reach the HTML only with "teardown" in the name
            added.append(extras.html(f"<p>{html.escape(header)}</p><pre>{html.escape(text)}</pre>"))
    report.extras = [*getattr(report, "extras", []), *added]  # type: ignore[attr-defined]
