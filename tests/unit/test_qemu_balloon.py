"""balloon.wait_for_reports: the wait before a save ends once QEMU's resident set stops shrinking.

A real process stands in for QEMU: one that gives back memory it touched, the way QEMU's resident set
shrinks when it discards the pages a guest reports free.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from pytest_vmfixtures.backends.qemu.balloon import resident_kib, wait_for_reports

SHRINKS = """
import sys, time
block = bytearray(96 << 20)
block[::4096] = b"x" * len(block[::4096])   # touched: resident
print("ready", flush=True)
time.sleep(0.5)
del block                                   # given back: the resident set shrinks by 96 MiB
time.sleep(60)
"""


def test_the_wait_sees_the_process_shrink_and_then_ends() -> None:
    process = subprocess.Popen([sys.executable, "-c", SHRINKS], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline() == "ready\n"
        started = time.monotonic()
        shrunk = wait_for_reports("test", process.pid, quiet=1.0, timeout=20)
        assert shrunk > 64
        assert time.monotonic() - started >= 1.0  # it waited out the quiet second after the shrink
    finally:
        process.kill()
        process.wait()
        process.stdout.close()  # type: ignore[union-attr]


def test_a_process_that_is_gone_is_not_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    assert resident_kib(process.pid) is None
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    assert wait_for_reports("test", process.pid, quiet=5, timeout=20) == 0.0
    assert slept == []  # returned at the first look, without waiting out the quiet period
