"""QEMU killed under a test, pytest killed under its guests: what the user sees, what is left."""

from __future__ import annotations

import fcntl
import os
import signal
import time
import uuid
from pathlib import Path

import pytest

from pytest_vmfixtures.runtime import reap

from .conftest import session_qemu, wait_for_file

KILLED_MID_TEST = '''
import os, signal, pytest
from pytest_vmfixtures import GuestError

def test_qemu_dies_under_me(vm):
    vm.run("true", check=True)
    os.kill(vm.machine.process.pid, signal.SIGKILL)
    with pytest.raises(GuestError) as info:
        vm.run("true")
    message = str(info.value)
    assert vm.name in message and "SIGKILL" in message and "console" in message

def test_next_test_gets_a_fresh_guest(vm):
    assert vm.run("echo fine", check=True).stdout == "fine\\n"
'''


def test_qemu_killed_mid_test(tmp_path: Path, outer_cache: Path, spawn_pytest) -> None:
    (tmp_path / "suite").mkdir()
    (tmp_path / "suite" / "test_k.py").write_text(KILLED_MID_TEST)
    inner = spawn_pytest(tmp_path / "suite", f"--vm-cache={outer_cache}")
    assert inner.proc.wait(600) == 0, inner.output()[-4000:]
    assert "2 passed" in inner.output()
    assert session_qemu(inner.proc.pid) == []


HOLD = '''
import pathlib, time

def test_hold(vm):
    vm.run("true", check=True)
    pathlib.Path(r"{flag}").write_text("up")
    time.sleep(600)
'''

HOLD_BOOT = '''
import pathlib, time

def test_hold(vm):
    time.sleep(600)
'''


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_pytest_killed_mid_test_leaves_nothing(sig: signal.Signals, tmp_path: Path, outer_cache: Path, spawn_pytest) -> None:
    flag = tmp_path / "up"
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_h.py").write_text(HOLD.format(flag=flag))
    inner = spawn_pytest(suite, f"--vm-cache={outer_cache}")
    wait_for_file(flag, inner)
    pids = session_qemu(inner.proc.pid)
    assert pids, "the inner run should own a running guest"
    inner.proc.send_signal(sig)
    inner.proc.wait(120)
    _assert_gone(pids)
    # Whatever files the dead session left, the next start's reaper removes; a live session's stay.
    reap(outer_cache / "run")
    assert not list((outer_cache / "run").glob(f"{inner.proc.pid}-*"))


def test_pytest_killed_mid_boot_leaves_nothing(tmp_path: Path, outer_cache: Path, spawn_pytest) -> None:
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_b.py").write_text(HOLD_BOOT)
    # A provision key of its own forces a cold boot: the kill lands while the guest boots.
    inner = spawn_pytest(suite, f"--vm-cache={outer_cache}", f"--vm-provision-key={uuid.uuid4().hex}")
    deadline = time.monotonic() + 300
    while not session_qemu(inner.proc.pid):
        assert inner.proc.poll() is None, inner.output()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(3)
    pids = session_qemu(inner.proc.pid)
    assert pids, f"the inner run's guest should still be booting:\n{inner.output()[-3000:]}"
    states_before = set((outer_cache / "states").iterdir()) if (outer_cache / "states").is_dir() else set()
    inner.proc.send_signal(signal.SIGKILL)
    inner.proc.wait(60)
    _assert_gone(pids)
    reap(outer_cache / "run")
    assert not list((outer_cache / "run").glob(f"{inner.proc.pid}-*"))
    # The half-made saved state is not in the cache; its temp dir goes at the next start.
    from pytest_vmfixtures.images.cache import Cache

    made = set((outer_cache / "states").iterdir()) - states_before if (outer_cache / "states").is_dir() else set()
    assert [p for p in made if (p / "manifest.json").exists()] == [], "a half-made state went into the cache"
    cache = Cache(outer_cache)
    cache.clean_tmp()
    # What remains is being built right now by a live run (its lock is held), never the dead run's.
    for leftover in (outer_cache / "tmp").iterdir():
        kind, _, rest = leftover.name.partition("--")
        with open(outer_cache / "locks" / f"{kind}-{rest.rsplit('-', 1)[0]}.lock", "a") as lock, pytest.raises(BlockingIOError):
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


KEPT = '''
def test_fails(vm):
    vm.run("true", check=True)
    assert False, "on purpose"
'''


def test_reaper_stops_the_kept_guest_of_a_dead_run(tmp_path: Path, outer_cache: Path, spawn_pytest) -> None:
    """A kept guest has no parent-death signal: it outlives its pytest until the reaper kills that real QEMU."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_kept.py").write_text(KEPT)
    inner = spawn_pytest(suite, f"--vm-cache={outer_cache}", "--vm-keep-on-failure")
    assert inner.proc.wait(600) == 1, inner.output()[-4000:]
    pids = session_qemu(inner.proc.pid)
    try:
        assert pids, "the kept guest should still run after its pytest exited"
        (session,) = (outer_cache / "run").glob(f"{inner.proc.pid}-*")
        assert session.name in reap(outer_cache / "run")
        _assert_gone(pids)
        assert not session.exists()
    finally:
        for pid in session_qemu(inner.proc.pid):  # only if the reaper failed
            os.kill(pid, signal.SIGKILL)


def _assert_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        alive = [p for p in pids if Path(f"/proc/{p}").exists() and _state(p) != "Z"]
        if not alive:
            return
        time.sleep(0.1)
    raise AssertionError(f"QEMU processes outlived their pytest: {alive}")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
