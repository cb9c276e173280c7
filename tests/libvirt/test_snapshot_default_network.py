"""Snapshot mode on libvirt's stock ``default`` network, as a new user would start it (``virsh net-start
default``), not only on the project's rig: SSH works after any number of reverts, even after a test
killed the guest's SSH server, and named snapshots go through libvirt's snapshot API.

The network is started here from libvirt's own definition if it is not running (and stopped again at the
end); that needs root, as libvirt's networks do. ``tiny``: its boot takes seconds.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from guests import pool_on_network, ssh_output  # noqa: E402
from rig import import_libvirt  # noqa: E402

libvirt = import_libvirt()

from pytest_vmfixtures.backends.base import MachineConfig  # noqa: E402
from pytest_vmfixtures.backends.libvirt import LibvirtMachine  # noqa: E402
from pytest_vmfixtures.pool import Pool  # noqa: E402
from pytest_vmfixtures.runtime import Runtime  # noqa: E402

CONFIG = MachineConfig("tiny")
STOCK_DEFINITION = Path("/usr/share/libvirt/networks/default.xml")  # what Debian's libvirt-daemon-system ships
REVERTS = 4


@pytest.fixture(scope="module")
def default_network(primary_uri: str) -> Iterator[str]:
    """libvirt's ``default`` network, running: started (defined first if need be) here if it was not."""
    conn = libvirt.open(primary_uri)
    defined = started = None
    try:
        try:
            network = conn.networkLookupByName("default")
        except libvirt.libvirtError:
            if os.geteuid() != 0 or not STOCK_DEFINITION.exists():
                pytest.skip(f"no libvirt network 'default' at {primary_uri}, and none can be defined here "
                            f"(needs root and {STOCK_DEFINITION})")
            network = defined = conn.networkDefineXML(STOCK_DEFINITION.read_text())
        if not network.isActive():
            try:
                network.create()
            except libvirt.libvirtError as exc:
                pytest.fail(f"cannot start libvirt's default network: {exc.get_error_message()}")
            started = network
        yield "default"
    finally:
        if started is not None:
            started.destroy()
        if defined is not None:
            defined.undefine()
        conn.close()


@pytest.fixture(scope="module")
def stock_pool(pool_factory: Callable[..., tuple[Pool, Runtime]], primary_uri: str,
               default_network: str) -> Iterator[Pool]:
    for pool, _runtime in pool_on_network(pool_factory, primary_uri, default_network):
        yield pool


def test_ssh_after_many_reverts_with_the_ssh_server_killed_first(stock_pool: Pool) -> None:
    vm = stock_pool.acquire(CONFIG)
    try:
        machine = vm._instance.machine
        assert isinstance(machine, LibvirtMachine) and machine.ssh_host.startswith("192.168.122.")
        vm.run("pkill -x dropbear; pkill -x sshd; true", check=True)  # through the agent: SSH is gone now
        for n in range(REVERTS):
            vm.reset()
            assert ssh_output(vm, f"echo revert-{n}") == f"revert-{n}\n"
            vm.run(f"echo {n} > /root/dirty", check=True)  # used again: the next reset reverts for real
    finally:
        stock_pool.release(vm)


def test_named_snapshots_through_libvirts_snapshot_api(stock_pool: Pool) -> None:
    vm = stock_pool.acquire(CONFIG)
    try:
        machine = vm._instance.machine
        assert isinstance(machine, LibvirtMachine)
        assert "qmp" not in vm.capabilities
        vm.run("echo one > /root/step", check=True)
        vm.snapshot("one")
        vm.run("echo two > /root/step", check=True)
        vm.revert("one")
        assert vm.run("cat /root/step", check=True).stdout == "one\n"
        assert ssh_output(vm, "echo after-named-revert") == "after-named-revert\n"
        names = sorted(str(s.getName()) for s in machine.domain.listAllSnapshots(0))
        assert len(names) == 2 and any(name.endswith("one") for name in names)
        vm.reset()  # back to clean: the test's snapshot goes with the test
        assert [str(s.getName()) for s in machine.domain.listAllSnapshots(0)] == ["vmfx-clean"]
        assert not vm.run("test -e /root/step").ok
    finally:
        stock_pool.release(vm)
