"""Snapshot mode: each guest's clean state is a hypervisor snapshot of its own persistent domain.

The portable path, for libvirt drivers without QMP or QEMU's save format (ESXi, Hyper-V,
VirtualBox, VMware), and selectable on the QEMU driver (``--vm-libvirt-mode snapshot``). A guest
boots once, is provisioned, and libvirt snapshots it (``snapshotCreateXML``: on the QEMU driver an
internal snapshot of the running domain, RAM included, inside its qcow2 overlay); revert is
``revertToSnapshot`` on the same domain. So there is no spare restored in the background and no
sharing of one state between guests: each concurrent guest takes its own first boot.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

from ...errors import SnapshotError
from ...images.image import BuiltImage
from ..base import MachineConfig
from .calls import bounded, libvirt
from .drivers import driver_for, portable_domain_xml, require_firmware_boot
from .machine import LibvirtMachine
from .xmltext import text

CLEAN_SNAPSHOT = "vmfx-clean"
NAMED_PREFIX = "vmfx-named-"  # a test's own snapshots (vm.snapshot): removed at the next clean revert
SNAPSHOT_SECONDS = 300.0  # taking or reverting one, RAM included, under emulation on a loaded host
REVERT_MARK = "[vmfixtures] ---- reverted to snapshot"
NO_CONSOLE = "[vmfixtures] no serial console here:"


def non_qemu_domain_xml(
    uri: str, image: BuiltImage, config: MachineConfig, disk: str, name: str, *, mac: str, network: str,
) -> str:
    """The domain XML of a guest on a libvirt driver other than QEMU's (ESXi, Hyper-V, VirtualBox, VMware,
    libvirt's test driver): the driver family's template (drivers.py) filled in, ``disk`` already in the
    family's format (convert.py). An image the family cannot boot is refused in one line."""
    driver = driver_for(uri)
    require_firmware_boot(image, driver)
    return portable_domain_xml(driver, name=name, memory_mb=config.memory_mb, cpus=config.cpus, disk=disk, mac=mac,
                               network=network, firmware=image.firmware or "bios",
                               **({"seed": str(image.seed)} if image.seed is not None else {}))


def console_missing(machine: LibvirtMachine, driver: str) -> None:
    """Where a driver cannot stream the serial console, its log says so rather than staying empty."""
    fd = os.open(machine.console_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(f"{NO_CONSOLE} libvirt's {driver} driver cannot stream a guest's serial console "
                f"to this machine (domain {machine.domain_name} on {machine.uri})\n")


def take_clean(machine: LibvirtMachine) -> None:
    """Snapshot the running, provisioned guest as its clean state (RAM included where the driver can)."""
    xml = (f"<domainsnapshot><name>{CLEAN_SNAPSHOT}</name>"
           "<description>pytest-vmfixtures: the clean state tests revert to</description></domainsnapshot>")
    try:
        machine.snapshot = bounded(f"{machine.name}: taking its clean snapshot",
                                   lambda: machine.domain.snapshotCreateXML(xml, 0), SNAPSHOT_SECONDS)
    except libvirt.libvirtError as exc:
        raise SnapshotError(f"{machine.name}: the hypervisor did not snapshot domain {machine.domain_name}: "
                            f"{exc.get_error_message()}") from exc


def revert_clean(machine: LibvirtMachine) -> None:
    """Back to the clean snapshot, running; a revert the hypervisor refuses is a SnapshotError."""
    snapshot = machine.snapshot
    if snapshot is None:
        raise SnapshotError(f"{machine.name}: domain {machine.domain_name} has no clean snapshot to revert to")
    _revert_running(machine, snapshot, f"snapshot {CLEAN_SNAPSHOT}")
    if machine.state() != "running":
        raise SnapshotError(f"{machine.name}: after reverting to {CLEAN_SNAPSHOT} the domain is {machine.state()}, "
                            "not running")
    drop_named(machine)
    if machine.console_log.exists():  # a console streamed to a file (append='on'): mark where the revert is
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        with open(machine.console_log, "a", encoding="utf-8") as f:
            f.write(f"\n{REVERT_MARK} {CLEAN_SNAPSHOT} at {when}; above: earlier tests and the first boot ----\n")


def _named(name: str) -> str:
    if not name or "/" in name or any(ord(c) < 32 for c in name):
        raise SnapshotError(f"snapshot name {name!r}: use a non-empty name without '/' or control characters")
    return NAMED_PREFIX + name


def take_named(machine: LibvirtMachine, name: str) -> None:
    """The test's snapshot ``name`` through libvirt's snapshot API (RAM included); taken again, it is replaced."""
    full = _named(name)
    xml = (f"<domainsnapshot><name>{text(full)}</name>"
           "<description>pytest-vmfixtures: a test's vm.snapshot()</description></domainsnapshot>")
    try:
        for old in machine.domain.listAllSnapshots(0):
            if str(old.getName()) == full:
                bounded(f"{machine.name}: replacing snapshot {name!r}", functools.partial(old.delete, 0), SNAPSHOT_SECONDS)
        bounded(f"{machine.name}: taking snapshot {name!r}", lambda: machine.domain.snapshotCreateXML(xml, 0),
                SNAPSHOT_SECONDS)
    except libvirt.libvirtError as exc:
        raise SnapshotError(f"{machine.name}: the hypervisor did not snapshot domain {machine.domain_name} as "
                            f"{name!r}: {exc.get_error_message()}") from exc


def revert_named(machine: LibvirtMachine, name: str) -> None:
    """Back to the test's snapshot ``name``, running."""
    full = _named(name)
    try:
        snapshot = machine.domain.snapshotLookupByName(full, 0)
    except libvirt.libvirtError as exc:
        raise SnapshotError(f"{machine.name}: the hypervisor did not revert domain {machine.domain_name} to "
                            f"{name!r}: {exc.get_error_message()}") from exc
    _revert_running(machine, snapshot, repr(name))


def _revert_running(machine: LibvirtMachine, snapshot: Any, what: str) -> None:
    """``revertToSnapshot`` back to a running guest, within its deadline; libvirt's refusal a SnapshotError."""
    try:
        bounded(f"{machine.name}: reverting to {what}",
                lambda: machine.domain.revertToSnapshot(snapshot, libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING),
                SNAPSHOT_SECONDS)
    except libvirt.libvirtError as exc:
        raise SnapshotError(f"{machine.name}: the hypervisor did not revert domain {machine.domain_name} to "
                            f"{what}: {exc.get_error_message()}") from exc


def drop_named(machine: LibvirtMachine) -> None:
    """Remove the snapshots tests took (they end with the test that took them); the clean one stays."""
    try:
        named = [s for s in machine.domain.listAllSnapshots(0) if str(s.getName()).startswith(NAMED_PREFIX)]
        for snapshot in named:
            bounded(f"{machine.name}: removing snapshot {snapshot.getName()}", functools.partial(snapshot.delete, 0),
                    SNAPSHOT_SECONDS)
    except libvirt.libvirtError as exc:
        raise SnapshotError(f"{machine.name}: cannot remove a test's snapshot of {machine.domain_name}: "
                            f"{exc.get_error_message()}") from exc
