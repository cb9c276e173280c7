"""The libvirt backend's snapshot mode on libvirt's QEMU driver, with real guests on a libvirt NAT network.

What is particular to the mode: a guest's clean state is a libvirt snapshot of its own persistent
domain, a revert happens in place, each concurrent guest has its own domain and snapshot, a revert
the hypervisor refuses drops the guest, and nothing (domain, snapshot, overlay) outlives the pool.
The tests run in file order and share one pool.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from guests import machine_of, pool_on_network
from rig import import_libvirt

libvirt = import_libvirt()

from pytest_vmfixtures.accel import AccelChoice  # noqa: E402
from pytest_vmfixtures.backends.base import MachineConfig  # noqa: E402
from pytest_vmfixtures.backends.libvirt import LibvirtBackend  # noqa: E402
from pytest_vmfixtures.backends.libvirt.snapshot import CLEAN_SNAPSHOT  # noqa: E402
from pytest_vmfixtures.errors import BootError, GuestError, SnapshotError  # noqa: E402
from pytest_vmfixtures.images.cache import Cache  # noqa: E402
from pytest_vmfixtures.images.catalog import BUILTIN_IMAGES_DIR  # noqa: E402
from pytest_vmfixtures.pool import Pool  # noqa: E402
from pytest_vmfixtures.runtime import Runtime  # noqa: E402

CONFIG = MachineConfig("tiny")  # boots in seconds; the contract tests run debian-12 through this mode (scripts/test)


@pytest.fixture(scope="module")
def snap_pool(pool_factory: Callable[..., tuple[Pool, Runtime]], primary_uri: str,
              nat_network: str) -> Iterator[tuple[Pool, Runtime]]:
    yield from pool_on_network(pool_factory, primary_uri, nat_network)


def ours(pool: Pool, runtime: Runtime) -> list[str]:
    """This pool's domains still defined or running on the host."""
    backend = pool.backend
    assert isinstance(backend, LibvirtBackend)
    conn = backend.hosts[0].conn
    return sorted(str(d.name()) for d in conn.listAllDomains(0) if f"-{runtime.session_id}-" in str(d.name()))


def test_the_backend_states_what_snapshot_mode_lacks(snap_pool: tuple[Pool, Runtime]) -> None:
    pool, _ = snap_pool
    assert pool.backend.capabilities == {"agent", "console"}


def test_revert_restores_a_destroyed_file_in_the_same_domain(snap_pool: tuple[Pool, Runtime]) -> None:
    pool, _ = snap_pool
    vm = pool.acquire(CONFIG)
    try:
        machine = machine_of(vm)
        assert machine.domain.isPersistent() and machine.ssh_port == 22 and machine.ssh_host.startswith("192.168.")
        assert [str(s.getName()) for s in machine.domain.listAllSnapshots(0)] == [CLEAN_SNAPSHOT]
        before = vm.run("sha256sum /etc/passwd", check=True).stdout
        vm.run("rm -f /etc/passwd /usr/sbin/dropbear && echo dirty > /root/marker", check=True)
        assert not vm.run("test -e /etc/passwd").ok
        started = time.monotonic()
        vm.reset()
        print(f"revert in snapshot mode: {time.monotonic() - started:.2f} s")
        assert machine_of(vm) is machine  # reverted in place, not swapped
        assert vm.run("sha256sum /etc/passwd", check=True).stdout == before
        assert vm.run("test -x /usr/sbin/dropbear && ! test -e /root/marker").ok
        assert "reverted to snapshot" in vm.console_log.read_text(errors="replace")
    finally:
        pool.release(vm)


def test_changes_are_measured_from_the_clean_snapshot(snap_pool: tuple[Pool, Runtime]) -> None:
    """vm.changes()' baseline was taken before the clean snapshot, so the in-place revert brings it back."""
    pool, _ = snap_pool
    vm = pool.acquire(CONFIG)
    try:
        vm.run("echo x > /etc/vmfx-snap && chmod 600 /etc/shells && rm /etc/profile", check=True)
        changes = vm.changes()
        assert (changes.added, changes.modified, changes.removed) == (["/etc/vmfx-snap"], ["/etc/shells"], ["/etc/profile"])
        vm.reset()
        assert str(vm.changes()) == "no changes"
    finally:
        pool.release(vm)


def test_concurrent_guests_each_have_their_own_domain_and_snapshot(snap_pool: tuple[Pool, Runtime]) -> None:
    pool, _ = snap_pool
    a = pool.acquire(CONFIG)  # the idle guest of the test before
    b = pool.acquire(CONFIG)  # none idle: a second domain, with its own first boot
    try:
        ma, mb = machine_of(a), machine_of(b)
        assert ma.domain_name != mb.domain_name and ma.ssh_host != mb.ssh_host
        a.run("echo a > /root/who", check=True)
        assert not b.run("test -e /root/who").ok
        for machine in (ma, mb):
            assert [str(s.getName()) for s in machine.domain.listAllSnapshots(0)] == [CLEAN_SNAPSHOT]
    finally:
        pool.release(a)
        pool.release(b)


def test_a_refused_revert_drops_the_domain_and_the_next_test_gets_a_new_one(snap_pool: tuple[Pool, Runtime]) -> None:
    pool, runtime = snap_pool
    vm = pool.acquire(CONFIG)
    machine = machine_of(vm)
    # Delete the snapshot behind the plugin's back (its data in the overlay too): libvirt then refuses the revert.
    machine.domain.snapshotLookupByName(CLEAN_SNAPSHOT, 0).delete(0)
    vm.run("true", check=True)  # used: the release reverts
    with pytest.raises(SnapshotError, match="did not revert domain"):
        pool.release(vm)
    deadline = time.monotonic() + 60  # the dropped guest is stopped off the test's path
    while machine.domain_name in ours(pool, runtime) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert machine.domain_name not in ours(pool, runtime)
    assert not Path(machine.overlay).exists()
    # The next test gets another guest (here the idle one of the test before; with none idle, a new boot).
    other = pool.acquire(CONFIG)
    try:
        assert machine_of(other).domain_name != machine.domain_name
        assert other.run("echo fine", check=True).stdout == "fine\n"
    finally:
        pool.release(other)


def test_nothing_is_left_behind(snap_pool: tuple[Pool, Runtime]) -> None:
    pool, runtime = snap_pool
    assert ours(pool, runtime)  # the guests of the tests above are idle
    backend = pool.backend
    assert isinstance(backend, LibvirtBackend)
    uri = backend.hosts[0].uri
    overlays = [Path(m.overlay) for m in backend.placement.machines()]
    pool.close()
    conn = libvirt.open(uri)
    try:
        left = sorted(str(d.name()) for d in conn.listAllDomains(0) if f"-{runtime.session_id}-" in str(d.name()))
    finally:
        conn.close()
    assert left == []  # undefined with their snapshots (listAllDomains(0) includes defined, stopped ones)
    assert overlays and not any(p.exists() for p in overlays)


def test_a_missing_network_is_a_one_line_error_naming_the_option(
        accel: AccelChoice, primary_uri: str, tmp_path: Path) -> None:
    runtime = Runtime(tmp_path, "libvirt-tests")
    try:
        with pytest.raises(GuestError) as info:
            LibvirtBackend(runtime, accel, [primary_uri], mode="snapshot", network="vmfx-no-such-network")
    finally:
        runtime.close()
    message = str(info.value)
    assert "\n" not in message and "--vm-libvirt-network vmfx-no-such-network" in message


def test_a_later_sessions_reaper_undefines_a_killed_runs_domains_and_snapshots(primary_uri: str, tmp_path: Path) -> None:
    """A run killed before its cleanup leaves persistent domains with snapshots; the next run's reaper removes them.

    The leftover is made by hand, as a killed run would leave it but without the minute a boot takes: a
    domain under a dead pid's name, never started, with an internal snapshot of its (tiny) qcow2 disk.
    """
    from pytest_vmfixtures.backends.libvirt.connection import Host, reap
    from pytest_vmfixtures.backends.libvirt.names import CLIENT

    dead_pid = 4_000_000  # above any pid_max: no such process
    name = f"vmfx-{dead_pid}-0123abcd-{CLIENT}-leftover-1"
    disk = tmp_path / "leftover.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1M"], check=True, timeout=60)
    conn = libvirt.open(primary_uri)
    try:
        domain = conn.defineXML(
            f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
            "<os><type arch='x86_64' machine='pc'>hvm</type></os><devices><disk type='file' device='disk'>"
            f"<driver name='qemu' type='qcow2'/><source file='{disk}'/><target dev='vda' bus='virtio'/></disk>"
            "</devices></domain>")
        try:
            domain.snapshotCreateXML(f"<domainsnapshot><name>{CLEAN_SNAPSHOT}</name></domainsnapshot>", 0)
            assert domain.snapshotNum(0) == 1
            reap(Host(primary_uri, conn, "", ""))
            assert name not in [str(d.name()) for d in conn.listAllDomains(0)]
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
    finally:
        conn.close()


def test_a_failed_start_leaves_no_domain(cache: Cache, accel: AccelChoice, primary_uri: str, nat_network: str) -> None:
    """A guest that shows no address in time (a deadline of one second here) is dropped: domain, overlay."""
    runtime = Runtime(cache.root, "libvirt-tests")
    try:
        backend = LibvirtBackend(runtime, accel, [primary_uri], mode="snapshot", network=nat_network, boot_timeout=1.0)
        pool = Pool(backend, cache, runtime, [BUILTIN_IMAGES_DIR], accel=accel.accel)
        try:
            with pytest.raises(BootError, match=f"no address on network '{nat_network}'"):
                backend.boot(pool.image("tiny"), CONFIG, runtime.new_name("tiny"))
            assert backend.placement.machines() == []
            conn = backend.hosts[0].conn
            assert [d.name() for d in conn.listAllDomains(0) if f"-{runtime.session_id}-" in str(d.name())] == []
            assert not list(runtime.run_dir.glob("*/overlay.qcow2"))
        finally:
            pool.close()
    finally:
        runtime.close()


def test_doctor_checks_the_network_snapshot_mode_needs(primary_uri: str, nat_network: str) -> None:
    from pytest_vmfixtures.doctor import FAIL, OK, check_libvirt_network

    [*_, good] = check_libvirt_network([primary_uri], nat_network)
    assert good.status == OK and nat_network in good.message
    [*_, bad] = check_libvirt_network([primary_uri], "vmfx-no-such-network")
    assert bad.status == FAIL and "--vm-libvirt-network vmfx-no-such-network" in bad.message


def test_a_missing_network_stops_the_run_once_before_any_test(primary_uri: str, pytester: pytest.Pytester) -> None:
    """Every snapshot-mode guest of the run would fail on it: one usage error at the start, not one per test."""
    pytester.makepyfile(test_m="def test_one(vm):\n    pass\n\ndef test_two(vm):\n    pass\n\ndef test_plain():\n    pass\n")
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--vm-backend=libvirt", "--vm-libvirt-mode=snapshot", f"--vm-libvirt-uri={primary_uri}",
        "--vm-libvirt-network=vmfx-no-such-network", f"--vm-cache={pytester.path / 'cache'}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.errlines if line.strip()]
    assert len(errors) == 1 and "--vm-libvirt-network vmfx-no-such-network" in errors[0], errors
    assert "--vm-unavailable=skip" in errors[0]
