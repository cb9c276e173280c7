"""Whole pytest runs in a subprocess: failures are reverted, nothing is left running."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_vmfixtures.fixtures import SESSION_KEY

from .helpers import default_signals, orphaned_qemu, plugin_env, qemu_processes

INNER = '''
import pytest

def test_fails_after_dirtying(vm):
    vm.run("echo dirty > /root/left-by-failed-test", check=True)
    assert False, "this test fails on purpose"

def test_sees_clean_guest(vm):
    assert not vm.run("test -e /root/left-by-failed-test").ok
'''

HOLD = '''
import pathlib, time

def test_hold(vm):
    vm.run("true", check=True)
    pathlib.Path(r"{flag}").write_text("up")
    time.sleep(300)
'''


def _cache_args(config: pytest.Config) -> list[str]:
    # The outer run's cache, resolved before pytester points HOME elsewhere.
    cache = config.stash[SESSION_KEY].settings.cache_dir
    return [f"--vm-cache={cache}", "-p", "no:cacheprovider"]


def test_failed_test_is_reverted_and_nothing_is_left(pytester: pytest.Pytester, request: pytest.FixtureRequest):
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess(*_cache_args(request.config), "-rA")
    result.assert_outcomes(passed=1, failed=1)
    # The failed test's report carries the guest's console tail.
    result.stdout.fnmatch_lines(["*Captured stdout call: vm debian-12-* console*"])
    assert orphaned_qemu() == []


def test_ctrl_c_stops_every_guest(pytester: pytest.Pytester, request: pytest.FixtureRequest, tmp_path: Path):
    flag = tmp_path / "guest-is-up"
    pytester.makepyfile(test_hold=HOLD.format(flag=flag))
    output = tmp_path / "inner.log"
    with open(output, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", *_cache_args(request.config), "-q", str(pytester.path)],
            cwd=pytester.path,
            env=plugin_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=default_signals,  # it gets a SIGINT: it must not inherit an ignored one
        )
    try:
        deadline = time.monotonic() + 300
        while not flag.exists():
            assert proc.poll() is None, output.read_text()
            assert time.monotonic() < deadline, "inner guest never came up"
            time.sleep(0.2)
        inner = [pid for pid in qemu_processes("") if _child_of_session(pid, proc.pid)]
        assert inner, "the inner run should have a QEMU process"
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(0.5)
    assert [pid for pid in inner if Path(f"/proc/{pid}").exists() and _state(pid) != "Z"] == []


def _child_of_session(pid: int, session_pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return f"/run/{session_pid}-" in cmdline


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


NO_MONITOR_CONFTEST = '''
import pytest
from pytest_vmfixtures.backends.qemu import QemuBackend


class WithoutMonitor(QemuBackend):
    """The real QEMU backend, stating what a hypervisor without QMP (VirtualBox, VMware, Hyper-V) would."""
    capabilities = frozenset({"saved_state", "agent", "console", "port_forward"})


@pytest.hookimpl
def pytest_vm_make_backend(config, runtime, accel):
    return WithoutMonitor(runtime, accel)
'''

NEEDS = '''
import pytest
from pytest_vmfixtures import QMPError

pytestmark = pytest.mark.vm(image="tiny")


@pytest.mark.vm(needs=["qmp"])
def test_needs_the_monitor(vm):
    vm.qmp.execute("query-status")


def test_without_asking(vm):
    with pytest.raises(QMPError, match="this hypervisor has no QMP monitor"):
        vm.qmp.execute("query-status")
    assert vm.run("echo still here", check=True).stdout == "still here\\n"


@pytest.mark.vm(needs=["agent", "console"])
def test_needs_what_it_has(vm_factory):
    assert vm_factory().run("true").ok
'''


def test_a_test_needing_what_the_hypervisor_lacks_is_skipped_with_the_reason(pytester: pytest.Pytester, request: pytest.FixtureRequest):
    pytester.makeconftest(NO_MONITOR_CONFTEST)
    pytester.makepyfile(test_needs=NEEDS)
    result = pytester.runpytest_subprocess(*_cache_args(request.config), "-rs")
    result.assert_outcomes(passed=2, skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED * needs qmp, which this run's hypervisor (qemu: qemu *) does not offer"])
    assert orphaned_qemu() == []
