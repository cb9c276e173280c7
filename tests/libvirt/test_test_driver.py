"""The libvirt backend's snapshot mode through a driver that is not QEMU's: libvirt's own test driver
(``test:///default``), built into libvirt, which keeps domains in memory and runs no guest.

It proves the driver-neutral flow of the backend itself, not a boot: the connection checks the driver is
compiled in and has snapshots, the disk is converted to the driver family's format and copied per guest,
the domain comes from the test family's template, its address from ``interfaceAddresses``, the clean
state is a libvirt snapshot, a revert goes back to it, and stopping leaves no domain, snapshot or disk.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from rig import import_libvirt

from pytest_vmfixtures.backends.base import MachineConfig
from pytest_vmfixtures.backends.libvirt import LibvirtBackend
from pytest_vmfixtures.backends.libvirt.names import DOMAIN_PREFIX
from pytest_vmfixtures.backends.libvirt.snapshot import CLEAN_SNAPSHOT
from pytest_vmfixtures.errors import GuestError
from pytest_vmfixtures.images.cache import Cache
from pytest_vmfixtures.images.image import BuiltImage
from pytest_vmfixtures.runtime import Runtime

libvirt = import_libvirt()
TEST_DRIVER = "test:///default"  # libvirt's own test driver


@pytest.fixture(scope="module")
def cloud_image(bios_cloud_image: BuiltImage) -> BuiltImage:
    return bios_cloud_image


def test_a_guest_on_libvirts_test_driver_goes_through_the_whole_portable_flow(test_driver_backend: LibvirtBackend,
                                                                               cloud_image: BuiltImage) -> None:
    assert test_driver_backend.capabilities == frozenset()  # no monitor, agent, console, saved state or forwarded port there
    machine = test_driver_backend.boot(cloud_image, MachineConfig(cloud_image.name), "portable-1")
    conn = machine.host.conn
    disk = Path(machine.overlay)
    try:
        assert conn.getType() == "TEST" and machine.domain.isPersistent()
        assert disk.exists() and disk.name.startswith("disk.")  # its own copy, in the guest's private directory
        assert machine.ssh_host and machine.ssh_host != "127.0.0.1"  # from interfaceAddresses, not a forward
        assert "no serial console here" in machine.console_log.read_text()
        test_driver_backend.take_clean(machine)
        assert [s.getName() for s in machine.domain.listAllSnapshots()] == [CLEAN_SNAPSHOT]
        machine.domain.suspend()  # a change libvirt's test driver can see
        test_driver_backend.revert_clean(machine)
        assert machine.state() == "running"
    finally:
        name = machine.domain_name
        machine.stop()
    assert name not in [d.name() for d in conn.listAllDomains(0)]
    assert not [d.name() for d in conn.listAllDomains(0) if d.name().startswith(DOMAIN_PREFIX)]
    assert not disk.exists(), "the guest's disk copy was left behind"


def test_a_driver_without_snapshots_or_not_compiled_in_is_refused_in_one_line(cache: Cache, accel: object) -> None:
    runtime = Runtime(cache.root, "test-driver-refused")
    try:
        with pytest.raises(GuestError) as caught:
            LibvirtBackend(runtime, accel, ["vmwarews:///session"], mode="snapshot")  # type: ignore[arg-type]
        # Debian's libvirt has the vmware driver (test_portable_drivers.py converts VMX through it), so the
        # refusal is the one for a driver without a snapshot API, not the one for a driver not compiled in.
        assert "\n" not in str(caught.value)
        assert "libvirt's VMware Workstation / Player / Fusion driver has no snapshot API" in str(caught.value)
    finally:
        runtime.close()
