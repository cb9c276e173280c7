"""The libvirt backend with real guests: boot, save, parallel restores, channels, revert, two libvirtds."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pytest_vmfixtures.accel import AccelChoice
from pytest_vmfixtures.backends.base import MachineConfig
from pytest_vmfixtures.backends.libvirt import LibvirtBackend, LibvirtMachine
from pytest_vmfixtures.backends.libvirt.save import stream_offset
from pytest_vmfixtures.command import new_tag
from pytest_vmfixtures.errors import GuestError, QMPError
from pytest_vmfixtures.images.cache import Cache
from pytest_vmfixtures.network import Network
from pytest_vmfixtures.pool import Pool
from pytest_vmfixtures.runtime import Runtime

CONFIG = MachineConfig("debian-12")
PoolFactory = Callable[..., tuple[Pool, Runtime]]


def domains(uri: str) -> list[str]:
    """Every domain libvirtd at ``uri`` knows, running or not, as `virsh list --all` shows them."""
    out = subprocess.run(["virsh", "-c", uri, "list", "--all", "--name"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def two_hosts(pool_factory: PoolFactory, primary_uri: str, second_uri: str) -> Iterator[tuple[Pool, Runtime]]:
    pool, runtime = pool_factory([primary_uri, second_uri])
    try:
        yield pool, runtime
    finally:
        pool.close()
        runtime.close()


def test_remote_host_without_an_ssh_route_is_refused_clearly(cache: Cache, accel: AccelChoice) -> None:
    runtime = Runtime(cache.root, "libvirt-tests")
    try:
        with pytest.raises(GuestError, match=r"use qemu\+ssh://build-farm.example/system for it"):
            LibvirtBackend(runtime, accel, ["qemu+tcp://build-farm.example/system"])
    finally:
        runtime.close()


def test_saved_state_is_a_private_libvirt_save_image(two_hosts: tuple[Pool, Runtime]) -> None:
    pool, _ = two_hosts
    state = pool._slot(CONFIG).state
    for path in (state.memory, state.disk):
        info = path.stat()
        assert info.st_uid == os.getuid()
        assert not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    assert not state.memory.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH)
    assert stream_offset(state.memory) > 0


def test_two_instances_from_one_state_run_at_once(two_hosts: tuple[Pool, Runtime]) -> None:
    pool, runtime = two_hosts
    slot = pool._slot(CONFIG)
    with ThreadPoolExecutor(2) as ex:
        first, second = ex.map(lambda _: slot.new_instance(), range(2))
    try:
        machines = [first.machine, second.machine]
        assert all(isinstance(m, LibvirtMachine) for m in machines)
        a, b = machines
        assert isinstance(a, LibvirtMachine) and isinstance(b, LibvirtMachine)
        assert a.domain_name != b.domain_name and a.domain.UUIDString() != b.domain.UUIDString()
        assert a.ssh_port != b.ssh_port and a.overlay != b.overlay
        assert a.domain_name.startswith(f"vmfx-{runtime.session_id}-")
        for instance in (first, second):
            machine = instance.machine
            assert isinstance(machine, LibvirtMachine)
            assert machine.state() == "running"
            assert machine.qmp.execute("query-status")["status"] == "running"
            assert instance.agent is not None and instance.agent.connected
            assert instance.agent.exec("echo agent-$((40+2))", new_tag(), 60).check().stdout == "agent-42\n"
            instance.ssh.connect(60)
            assert instance.ssh.exec("echo ssh-ok", new_tag(), 60).check().stdout == "ssh-ok\n"
        # Each has its own disk: a file made in one is not in the other.
        first.ssh.exec("echo mine > /root/marker && sync", new_tag(), 60).check()
        assert not second.ssh.exec("test -e /root/marker", new_tag(), 60).ok
        # The pool spread them over the two libvirtds.
        assert {a.uri, b.uri} == set(pool.backend.load())  # type: ignore[attr-defined]
    finally:
        first.close()
        second.close()
    for instance in (first, second):
        machine = instance.machine
        assert isinstance(machine, LibvirtMachine)
        assert machine.domain_name not in domains(machine.uri)
        assert not Path(machine.overlay).exists()
        machine.stop()  # twice is fine


def test_qmp_through_libvirt(two_hosts: tuple[Pool, Runtime]) -> None:
    pool, _ = two_hosts
    vm = pool.acquire(CONFIG)
    try:
        assert vm.qmp.execute("query-status")["status"] == "running"
        with pytest.raises(QMPError) as info:
            vm.qmp.execute("no-such-command")
        assert info.value.error_class == "CommandNotFound"
        assert "no-such-command" in str(info.value)
        version = vm.qmp.execute("query-version")["qemu"]  # the monitor's reply names the same QEMU
        assert vm.machine.qmp.human("info version").startswith(f"{version['major']}.{version['minor']}.{version['micro']}")
    finally:
        pool.release(vm)


def test_revert_swaps_in_a_clean_guest(two_hosts: tuple[Pool, Runtime]) -> None:
    pool, _ = two_hosts
    vm = pool.acquire(CONFIG)
    try:
        assert vm.run("test -e /etc/passwd").ok
        vm.run("rm -rf /etc /root; echo dirty > /tmp/dirty", timeout=60)
        assert not vm.run("test -e /etc/passwd").ok
        before = vm.machine
        pool._slot(CONFIG).wait_for_spares()  # as after a real test's run time: the spare is ready
        started = time.monotonic()
        vm.reset()
        result = vm.run("test -e /etc/passwd && ! test -e /tmp/dirty")
        elapsed = time.monotonic() - started
        assert result.ok, result
        assert vm.machine is not before
        print(f"revert (swap to the spare) + first command: {elapsed:.2f} s")
        _, stdout, _ = vm.ssh.exec_command("echo ssh-ok")  # SSH works on the swapped-in guest too
        assert stdout.read().decode().strip() == "ssh-ok"
        assert stdout.channel.recv_exit_status() == 0
    finally:
        pool.release(vm)


def test_changes_through_a_libvirt_saved_state(two_hosts: tuple[Pool, Runtime]) -> None:
    """vm.changes()' baseline is in the saved RAM: every guest restored from the libvirt save image has it."""
    pool, _ = two_hosts
    vm = pool.acquire(CONFIG)
    try:
        vm.run("echo x > /etc/vmfx-libvirt && rm /etc/profile", check=True)
        changes = vm.changes()
        assert (changes.added, changes.modified, changes.removed) == (["/etc/vmfx-libvirt"], [], ["/etc/profile"])
        vm.reset()
        assert str(vm.changes()) == "no changes"
    finally:
        pool.release(vm)


def test_guests_spread_least_loaded_first(pool_factory: PoolFactory, primary_uri: str, second_uri: str) -> None:
    pool, runtime = pool_factory([primary_uri, second_uri], standby=0)  # no spares: only our guests count
    instances = []
    try:
        backend = pool.backend
        assert isinstance(backend, LibvirtBackend)
        slot = pool._slot(CONFIG)
        for n in range(4):
            instances.append(slot.new_instance())
            load = backend.load()
            assert sorted(load.values()) == sorted([(n + 1) // 2, (n + 2) // 2]), load
        assert backend.load() == {primary_uri: 2, second_uri: 2}
        for host in backend.hosts:
            mine = {i.machine.domain_name for i in instances if i.machine.uri == host.uri}  # type: ignore[attr-defined]
            assert len(mine) == 2 and mine <= set(domains(host.uri))
        instances.pop(0).close()  # the first went to the first URI; it is now the least loaded
        instances.append(slot.new_instance())
        assert instances[-1].machine.uri == primary_uri  # type: ignore[attr-defined]
    finally:
        for instance in instances:
            instance.close()
        pool.close()
        runtime.close()


def test_close_leaves_no_domains_on_either_libvirtd(
    pool_factory: PoolFactory, primary_uri: str, second_uri: str
) -> None:
    pool, runtime = pool_factory([primary_uri, second_uri])
    prefix = f"vmfx-{runtime.session_id}-"
    try:
        vm = pool.acquire(CONFIG)
        vm.run("true", check=True)
        assert any(n.startswith(prefix) for uri in (primary_uri, second_uri) for n in domains(uri))
        pool.release(vm)
    finally:
        pool.close()
        runtime.close()
    for uri in (primary_uri, second_uri):
        assert [n for n in domains(uri) if n.startswith(prefix)] == []


def test_a_kept_guest_outlives_the_pool(pool_factory: PoolFactory, primary_uri: str) -> None:
    """--vm-keep-on-failure with libvirt: the failed test's domain stays up after the run ends."""
    pool, runtime = pool_factory([primary_uri], standby=0)
    try:
        vm = pool.acquire(CONFIG)
        vm.run("touch /tmp/evidence", check=True)
        machine = vm._instance.machine
        assert isinstance(machine, LibvirtMachine)
        pool.keep(vm, "test_x failed")
    finally:
        pool.close()
    try:
        assert machine.domain_name in domains(primary_uri)
        assert machine.state() == "running"
    finally:
        machine.stop()
        runtime.close()
    assert machine.domain_name not in domains(primary_uri)


def test_a_private_network_does_not_span_two_hypervisor_machines(
    pool_factory: PoolFactory, primary_uri: str, second_uri: str
) -> None:
    pool, runtime = pool_factory([primary_uri, second_uri], standby=0)
    backend = pool.backend
    assert isinstance(backend, LibvirtBackend)
    backend.hosts[1].machine = "hv-elsewhere"  # as if the second libvirtd ran on another machine
    try:
        net = Network(backend, lambda **_: pool.acquire(CONFIG))
        net.add("server")  # the first URI
        with pytest.raises(GuestError, match=r"vm_network .* cannot span machines; run such tests with one"):
            net.add("client")  # the least loaded: the second URI, "elsewhere"
    finally:
        pool.close()
        runtime.close()
