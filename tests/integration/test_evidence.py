"""What a failed test leaves behind: report sections, JUnit XML, artifacts, a kept guest."""

from __future__ import annotations

import os
import re
import signal
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pytest_vmfixtures.fixtures import SESSION_KEY

FAILING = '''
def test_fails(vm):
    vm.run("echo console-marker > /dev/ttyS0; echo journal-marker > /dev/kmsg", check=True)
    assert False, "on purpose"
'''


def _cache(request: pytest.FixtureRequest) -> str:
    return f"--vm-cache={request.config.stash[SESSION_KEY].settings.cache_dir}"


def test_failed_test_leaves_evidence(pytester: pytest.Pytester, request: pytest.FixtureRequest) -> None:
    pytester.makepyfile(test_fail=FAILING)
    artifacts = pytester.path / "artifacts"
    junit = pytester.path / "junit.xml"
    result = pytester.runpytest_subprocess(_cache(request), f"--vm-artifacts={artifacts}", f"--junitxml={junit}", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*Captured stdout call: vm debian-12-* console*", "*evidence of failed tests in*"])
    saved = {p.name: p for p in artifacts.rglob("*") if p.is_file()}
    assert {"console.log", "screen.png", "journal.txt"} <= set(saved)
    assert saved["screen.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "journal-marker" in saved["journal.txt"].read_text()
    assert "console-marker" in saved["console.log"].read_text()
    properties = {p.get("name"): p.get("value") for p in ET.parse(junit).iter("property")}
    assert any(name.startswith("vm debian-12-") and "console-marker" in value for name, value in properties.items())


def test_keep_on_failure_keeps_the_guest_and_says_how_to_get_in(pytester: pytest.Pytester, request: pytest.FixtureRequest) -> None:
    pytester.makepyfile(test_fail=FAILING)
    result = pytester.runpytest_subprocess(_cache(request), "--vm-keep-on-failure", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    line = next(x for x in result.stdout.lines if "kept failed guest" in x)
    port = int(re.search(r"-p (\d+)", line).group(1))  # type: ignore[union-attr]
    pids = _qemu_with_port(port)
    try:
        assert pids, "the failed guest should still run after pytest exited"
        assert "ssh -i " in line and "root@127.0.0.1" in line
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def _qemu_with_port(port: int) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "qemu-system" in cmdline and f"hostfwd=tcp:127.0.0.1:{port}-" in cmdline:
                found.append(int(proc.name))
    return found
