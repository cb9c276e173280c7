"""Snapshot mode's pieces on libvirt's real QEMU driver: the backend boots your own cloud image (the
BIOS stand-in) on a libvirt NAT network started here, the guest's address comes from the network's
DHCP lease, the clean state is a hypervisor snapshot that a revert really goes back to, and the one
teardown (teardown.drop_domain) leaves nothing, NVRAM included.

The pool runs the whole contract on top of these (test_snapshot_mode.py, on the tiny image); this
checks a guest that boots its own disk through firmware. The UEFI domain's files go where libvirt's
QEMU user can read them (its images directory); the network needs root too.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest
from rig import import_libvirt
from rig import missing as rig_missing

from pytest_vmfixtures.accel import AccelChoice
from pytest_vmfixtures.backends.base import MachineConfig
from pytest_vmfixtures.backends.libvirt import LibvirtBackend, LibvirtMachine
from pytest_vmfixtures.backends.libvirt.connection import Host
from pytest_vmfixtures.backends.libvirt.snapshot import take_clean
from pytest_vmfixtures.backends.libvirt.teardown import drop_domain
from pytest_vmfixtures.channels.ssh import SSH, SSHError
from pytest_vmfixtures.command import new_tag
from pytest_vmfixtures.errors import CommandTimeout, SnapshotError
from pytest_vmfixtures.images.cache import Cache
from pytest_vmfixtures.images.image import BuiltImage
from pytest_vmfixtures.runtime import Runtime
from pytest_vmfixtures.waiting import wait_for

libvirt = import_libvirt()

IMAGES_DIR = Path("/var/lib/libvirt/images")
BOOT_TIMEOUT = 600.0
TAG = f"vmfx-portable-{os.getpid()}"


def free_subnet(conn: Any) -> ipaddress.IPv4Network:
    """A /24 that no libvirt network and no route of this machine uses."""
    used = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, timeout=30).stdout
    for net in conn.listAllNetworks(0):
        used += net.XMLDesc(0)
    for third in range(200, 250):
        if f"192.168.{third}." not in used:
            return ipaddress.IPv4Network(f"192.168.{third}.0/24")
    rig_missing("no free 192.168.x.0/24 for a test network")


@pytest.fixture(scope="module")
def conn(primary_uri: str) -> Iterator[Any]:
    if os.geteuid() != 0:
        rig_missing("a libvirt NAT network and libvirt's images directory need root")
    conn = libvirt.open(primary_uri)
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture(scope="module")
def subnet(conn: Any) -> ipaddress.IPv4Network:
    return free_subnet(conn)


@pytest.fixture(scope="module")
def network(conn: Any, subnet: ipaddress.IPv4Network) -> Iterator[str]:
    host = subnet.network_address + 1
    xml = (f"<network><name>{TAG}</name><forward mode='nat'/><bridge name='vmfxpt{os.getpid() % 100000}' stp='off'/>"
           f"<ip address='{host}' netmask='255.255.255.0'><dhcp><range start='{subnet.network_address + 10}' "
           f"end='{subnet.network_address + 99}'/></dhcp></ip></network>")
    net = conn.networkCreateXML(xml)  # transient: gone once destroyed
    try:
        yield TAG
    finally:
        net.destroy()


@pytest.fixture(scope="module")
def cloud_image(bios_cloud_image: BuiltImage) -> BuiltImage:
    return bios_cloud_image


@pytest.fixture
def files() -> Iterator[Path]:
    directory = IMAGES_DIR / TAG
    directory.mkdir(parents=True, exist_ok=True)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def run(ssh: SSH, command: str, timeout: float = BOOT_TIMEOUT) -> str:
    """``command``'s output, once SSH answers (reconnecting while the guest comes up or comes back)."""
    def attempt() -> str | None:
        try:
            ssh.connect(timeout=5)
            result = ssh.exec(command, new_tag(), 120)
        except (SSHError, CommandTimeout):
            ssh.close()
            return None
        assert result.ok, result.stderr
        return result.stdout

    output: str = wait_for(f"{command!r} over SSH", attempt, timeout, interval=0.25, max_interval=1.0)
    return output


def test_a_cloud_guest_is_reverted_to_its_clean_snapshot(primary_uri: str, network: str, subnet: ipaddress.IPv4Network,
                                                         cloud_image: BuiltImage, cache: Cache, accel: AccelChoice) -> None:
    runtime = Runtime(cache.root, "portable-qemu")
    backend = LibvirtBackend(runtime, accel, [primary_uri], mode="snapshot", network=network)
    ssh: SSH | None = None
    try:
        started = time.monotonic()
        machine = backend.boot(cloud_image, MachineConfig(cloud_image.name), TAG)
        conn, name = machine.host.conn, machine.domain_name
        assert machine.domain.isPersistent() and ipaddress.ip_address(machine.ssh_host) in subnet  # its DHCP lease
        ssh = SSH(machine.ssh_host, 22, cloud_image.user,
                  paramiko.Ed25519Key.from_private_key_file(str(cloud_image.client_key)), cloud_image.host_key, TAG)
        run(ssh, "cloud-init status --wait >/dev/null; true")
        print(f"\n  booted to SSH at {machine.ssh_host} in {time.monotonic() - started:.1f} s")

        backend.take_clean(machine)
        assert run(ssh, "sudo -n touch /root/dirty && sudo -n ls /root") == "dirty\n"
        for _ in range(2):
            reverting = time.monotonic()
            backend.revert_clean(machine)
            reverted = time.monotonic() - reverting
            ssh.close()
            ssh.host = machine.ssh_host  # the address the network gives it after the revert
            assert run(ssh, "sudo -n ls -A /root | grep -c dirty || true") == "0\n"
            print(f"  revert {reverted:.2f} s, to the first command after it {time.monotonic() - reverting:.2f} s")
        machine.stop()
        assert name not in [d.name() for d in conn.listAllDomains(0)]  # undefined, with its snapshot
    finally:
        if ssh is not None:
            ssh.close()
        backend.close()
        runtime.close()


UEFI_XML = """<domain type='qemu'><name>{name}</name><memory unit='MiB'>256</memory>
<os firmware='efi'><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features>
<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/>
<target dev='vda' bus='virtio'/></disk><interface type='network'><source network='{network}'/></interface></devices>
</domain>"""


def test_a_uefi_guest_has_no_clean_snapshot_and_nothing_is_left(conn: Any, network: str, files: Path) -> None:
    """libvirt 9.0 refuses internal snapshots with pflash firmware: why snapshot mode runs BIOS images on
    other drivers. The domain here boots nothing (an empty disk); what matters is the refusal and the
    teardown, which must undefine a domain that has an NVRAM (a plain undefine is refused there)."""
    disk = files / "empty.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True, timeout=60)
    domain = conn.defineXML(UEFI_XML.format(name=f"{TAG}-uefi", disk=disk, network=network))
    try:
        domain.create()
        machine = LibvirtMachine(Host(conn.getURI(), conn, "", ""), domain, f"{TAG}-uefi", files, 22, "<domain/>",
                                 False, disk, str(disk), on_stop=lambda machine: None)
        if conn.getLibVersion() < 10_000_000:
            with pytest.raises(SnapshotError, match="internal snapshots of a VM with pflash based firmware are not "
                                                    "supported"):
                take_clean(machine)
    finally:
        assert drop_domain(domain) == []  # undefined with its NVRAM
    assert f"{TAG}-uefi" not in [d.name() for d in conn.listAllDomains(0)]
