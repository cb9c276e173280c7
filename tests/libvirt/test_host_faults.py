"""A libvirt host that is unreachable from the start, or whose libvirtd dies mid-run (killed for real)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from rig import import_libvirt
from rig import missing as rig_missing

from pytest_vmfixtures.accel import AccelChoice
from pytest_vmfixtures.backends.base import MachineConfig
from pytest_vmfixtures.backends.libvirt import LibvirtBackend, LibvirtMachine
from pytest_vmfixtures.errors import GuestError
from pytest_vmfixtures.images.cache import Cache
from pytest_vmfixtures.pool import Pool
from pytest_vmfixtures.runtime import Runtime

libvirt = import_libvirt()
CONFIG = MachineConfig("debian-12")
NOWHERE = "qemu:///system?socket=/nonexistent/vmfx/libvirt-sock"
SCRIPT = Path(__file__).resolve().parent / "second_libvirtd.sh"
PoolFactory = Callable[..., tuple[Pool, Runtime]]


def our_domains(uri: str, runtime: Runtime) -> list[str]:
    out = subprocess.run(["virsh", "-q", "-c", uri, "list", "--all", "--name"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return [n for n in out.stdout.split() if n.startswith(f"vmfx-{runtime.session_id}-")]


def host_of(vm: object) -> str:
    machine = vm._instance.machine  # type: ignore[attr-defined]
    assert isinstance(machine, LibvirtMachine)
    return machine.host.uri


def test_an_unreachable_uri_leaves_the_guests_to_the_others(pool_factory: PoolFactory, primary_uri: str) -> None:
    pool, runtime = pool_factory([NOWHERE, primary_uri], standby=0)
    try:
        vm = pool.acquire(CONFIG)
        assert vm.run("true").ok
        assert host_of(vm) == primary_uri
    finally:
        pool.close()
        runtime.close()


def test_only_unreachable_uris_is_a_clear_error(cache: Cache, accel: AccelChoice) -> None:
    runtime = Runtime(cache.root, "libvirt-tests")
    try:
        with pytest.raises(GuestError, match=r"cannot connect to libvirt at qemu:///system\?socket=/nonexistent"):
            LibvirtBackend(runtime, accel, [NOWHERE])
    finally:
        runtime.close()


def test_a_libvirtd_dying_mid_run_fails_only_its_guests(
    pool_factory: PoolFactory, primary_uri: str, second_uri: str
) -> None:
    ours = subprocess.run(["sh", str(SCRIPT), "uri"], capture_output=True, text=True, timeout=10).stdout.strip()
    if second_uri != ours:
        rig_missing("kills and restarts the second libvirtd: only the one second_libvirtd.sh runs")
    pool, runtime = pool_factory([second_uri, primary_uri], standby=0)
    restarted = False
    try:
        doomed = pool.acquire(CONFIG)  # ties go to the first URI
        survivor = pool.acquire(CONFIG)
        assert (host_of(doomed), host_of(survivor)) == (second_uri, primary_uri)
        base = Path(os.environ.get("VMFX_LIBVIRTD2_DIR", "/tmp/vmfx-libvirtd2"))
        pid = int((base / "libvirtd.pid").read_text())
        os.kill(pid, signal.SIGKILL)

        with pytest.raises(GuestError, match=r"connection to libvirt at .*vmfx-libvirtd2.* was lost"):
            doomed.run("true")
        assert survivor.run("echo still here").stdout.strip() == "still here"
        pool.release(doomed)  # dead: dropped, not reused
        replacement = pool.acquire(CONFIG)  # the dead host is tried, marked down, and skipped
        assert host_of(replacement) == primary_uri
        assert replacement.run("true").ok
        assert any(h.down for h in pool.backend.hosts)  # type: ignore[attr-defined]

        subprocess.run(["sh", str(SCRIPT), "restart"], check=True, timeout=60)
        restarted = True
        assert our_domains(second_uri, runtime)  # the guest outlived its libvirtd, which found it again
    finally:
        pool.close()  # sweeps the host that came back
        runtime.close()
        if not restarted:
            subprocess.run(["sh", str(SCRIPT), "restart"], timeout=60)
    assert our_domains(second_uri, runtime) == []
    assert our_domains(primary_uri, runtime) == []
