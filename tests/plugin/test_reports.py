"""Evidence in reports without a guest: the JUnit writer under each junit_logging, pytest-html absent,
disabled or too old, testinfra missing or too old.

The evidence section a failed guest test's teardown report carries is put there by a conftest hook
here (it is what reports.add_sections writes); the guest side is tests/integration/test_reports.py.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from importlib.metadata import PackageNotFoundError

import pytest

from pytest_vmfixtures import MissingExtra, reports, testinfra_host

CONFTEST = '''
import pytest

@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "teardown" and item.name == "test_fails":
        report.sections.append(("Captured stdout teardown: vm debian-12-1 evidence",
                                "[[ATTACHMENT|/evidence/console.log]]\\nscreen: not saved: the guest was no longer running\\n"))
    return report
'''

TESTS = '''
def test_fails():
    print("own output")
    assert False

def test_passes():
    pass
'''


def _system_out(pytester: pytest.Pytester, *args: str) -> dict[str, str]:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_it=TESTS)
    junit = pytester.path / "junit.xml"
    result = pytester.runpytest("-p", "no:cacheprovider", f"--junitxml={junit}", *args)
    result.assert_outcomes(failed=1, passed=1)
    cases = {c.get("name", ""): c for c in ET.parse(junit).iter("testcase")}
    return {name: "".join(e.text or "" for e in case.iter("system-out")) for name, case in cases.items()}


@pytest.mark.parametrize("logging", ["no", "system-out", "all", "system-err", "out-err"])
def test_each_junit_logging_gets_the_attachment_lines_once(pytester: pytest.Pytester, logging: str) -> None:
    out = _system_out(pytester, "-o", f"junit_logging={logging}")
    assert len(re.findall(r"\[\[ATTACHMENT\|/evidence/console\.log\]\]", out["test_fails"])) == 1, out["test_fails"]
    assert "screen: not saved: the guest was no longer running" in out["test_fails"]
    assert "ATTACHMENT" not in out["test_passes"]
    assert ("own output" in out["test_fails"]) == (logging in reports.JUNIT_WRITES_STDOUT)  # the user's choice stands


def test_html_disabled_or_absent_adds_nothing_and_does_not_crash(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_it=TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:html")
    result.assert_outcomes(failed=1, passed=1)
    assert "vmfixtures: warning: pytest-html" not in result.stdout.str()


def test_too_old_pytest_html_is_one_header_line(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reports, "version", lambda name: "3.2.0")
    pytester.makepyfile(test_it="def test_passes():\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", f"--html={pytester.path / 'r.html'}")
    result.assert_outcomes(passed=1)
    [line] = [x for x in result.stdout.lines if "pytest-html" in x and "vmfixtures" in x]
    assert "pytest-html 3.2.0 is older than 4.0" in line and "pip install 'pytest-html>=4'" in line


def test_html_state_without_html_option_is_silent(pytester: pytest.Pytester) -> None:
    config = pytester.parseconfig("-p", "no:cacheprovider")
    assert reports.html_plugin_state(config) == ""


def test_vm_host_without_testinfra_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = testinfra_host.importlib.import_module

    def no_testinfra(name: str) -> object:
        if name.startswith("testinfra"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name)

    monkeypatch.setattr(testinfra_host.importlib, "import_module", no_testinfra)
    with pytest.raises(MissingExtra) as caught:
        testinfra_host.make_host(object())  # type: ignore[arg-type]
    message = str(caught.value)
    assert "\n" not in message and "pip install 'pytest-vmfixtures[testinfra]'" in message
    assert isinstance(caught.value, ImportError)


def test_vm_host_with_too_old_testinfra_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("importlib.metadata.version", lambda name: "6.0.0")
    with pytest.raises(MissingExtra, match=r"pytest-testinfra >= 10\.0, found 6\.0\.0: pip install"):
        testinfra_host.make_host(object())  # type: ignore[arg-type]


def test_testinfra_from_a_source_tree_is_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    def unknown(name: str) -> str:
        raise PackageNotFoundError(name)

    monkeypatch.setattr("importlib.metadata.version", unknown)

    class Guest:
        name = "g"

    host = testinfra_host.make_host(Guest())  # type: ignore[arg-type]
    assert host.backend.get_pytest_id() == "vmfixtures://g"


def test_the_reports_journal_tail_leaves_out_the_agents_call_log() -> None:
    journal = (
        "[ 1.0] g systemd[1]: Started ssh.service\n"
        "[ 2.0] g qemu-ga[209]: info: guest-exec called: \"/bin/sh -c cd\n"
        "                                { journalctl -b; }\"\n"
        "[ 2.1] g qemu-ga[209]: info: guest-exec-status called, pid: 234\n"
        "[ 3.0] g unknown: journal-marker\n"
        "          continued\n"
    )
    assert reports.journal_lines(journal) == [
        "[ 1.0] g systemd[1]: Started ssh.service", "[ 3.0] g unknown: journal-marker", "          continued"]
