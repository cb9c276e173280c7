"""Fault injection against real guests and real pytest processes."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from integration.helpers import default_signals, qemu_processes

from pytest_vmfixtures.accel import choose_accel, probe_host
from pytest_vmfixtures.backends.qemu import QemuBackend
from pytest_vmfixtures.fixtures import SESSION_KEY
from pytest_vmfixtures.images.cache import Cache
from pytest_vmfixtures.images.catalog import BUILTIN_IMAGES_DIR
from pytest_vmfixtures.pool import Pool
from pytest_vmfixtures.runtime import Runtime


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The cache-integrity check (test_zz_cache_intact.py) goes last in the session, after every test that
    uses the cache; the order directories are collected in would put it before integration and libvirt."""
    last = [item for item in items if item.path.name == "test_zz_cache_intact.py"]
    for item in last:
        items.remove(item)
    items.extend(last)


@contextlib.contextmanager
def inline_pool(outer_cache: Path, worker: str, **backend_options: str) -> Iterator[Pool]:
    """A QEMU pool over the run's cache (its saved states reused), guests restored in line (no spares)."""
    runtime = Runtime(outer_cache, worker)
    accel = choose_accel("auto", probe_host())
    made = Pool(QemuBackend(runtime, accel, **backend_options), Cache(outer_cache), runtime, [BUILTIN_IMAGES_DIR],
                accel=accel.accel, standby=0)
    try:
        yield made
    finally:
        made.close()
        runtime.close()


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
                preexec_fn=default_signals,  # some get a SIGINT: they must not inherit an ignored one
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
    return [pid for pid in qemu_processes("/run/") if re.search(rf"/run/{session_pid}-[0-9a-f]{{8}}/", _cmdline(pid))]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def wait_for_file(path: Path, inner: Inner, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert inner.proc.poll() is None, f"inner pytest ended early:\n{inner.output()[-3000:]}"
        assert time.monotonic() < deadline, f"{path} never appeared:\n{inner.output()[-3000:]}"
        time.sleep(0.2)
