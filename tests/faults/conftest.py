"""Fault injection against real guests and real pytest processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_vmfixtures.fixtures import SESSION_KEY


@pytest.fixture
def outer_cache(request: pytest.FixtureRequest) -> Path:
    """The cache of this run (resolved before pytester moves HOME), so inner runs reuse its images."""
    return request.config.stash[SESSION_KEY].settings.cache_dir


@dataclass
class Inner:
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def spawn_pytest(tmp_path: Path) -> Iterator[object]:
    """Start pytest on a directory in a subprocess; whatever is left running is killed at the end."""
    started: list[Inner] = []

    def spawn(directory: Path, *args: str) -> Inner:
        log = tmp_path / f"inner-{len(started)}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VMFIX_"))}
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-s", *args, str(directory)],
                cwd=directory, env=env, stdout=out, stderr=subprocess.STDOUT,
            )
        inner = Inner(proc, log)
        started.append(inner)
        return inner

    yield spawn
    for inner in started:
        if inner.proc.poll() is None:
            inner.proc.kill()
            inner.proc.wait()


def session_qemu(session_pid: int) -> list[int]:
    """Live QEMU processes started by the pytest process ``session_pid`` (its run dir is named after it)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if "qemu-system" in cmdline and re.search(rf"/run/{session_pid}-[0-9a-f]{{8}}/", cmdline) and state != "Z":
            found.append(int(proc.name))
    return found


def wait_for_file(path: Path, inner: Inner, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert inner.proc.poll() is None, f"inner pytest ended early:\n{inner.output()[-3000:]}"
        assert time.monotonic() < deadline, f"{path} never appeared:\n{inner.output()[-3000:]}"
        time.sleep(0.2)
