"""Build tools run with a deadline: a hung one is killed, with its children, and named."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pytest_vmfixtures.errors import ImageError
from pytest_vmfixtures.images.tools import run_tool


def test_a_hung_tool_is_killed_at_its_deadline_with_a_message_naming_it(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    # The tool starts a child that would outlive it: the whole group must go.
    script = f"sleep 300 & echo $! > {pidfile}; wait"
    with pytest.raises(ImageError, match=r"^sh did not finish within 1 s and was killed; check the mirror"):
        run_tool(["sh", "-c", script], hint="check the mirror", timeout=1)
    child = int(pidfile.read_text())
    for _ in range(50):  # SIGKILL is delivered at once; reaping the orphan by init can lag a little
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the tool's child {child} still runs")


def test_a_failing_tool_still_shows_its_output() -> None:
    with pytest.raises(ImageError, match=r"sh failed \(exit 3\); fix it:\nE: broken"):
        run_tool(["sh", "-c", "echo 'E: broken' >&2; exit 3"], hint="fix it")
