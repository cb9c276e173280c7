"""The portable path's pieces on libvirt's real QEMU driver: the QEMU template boots your own cloud
image (the BIOS stand-in) on a libvirt NAT network started here, the guest's address comes from the
network's DHCP lease, and the clean state is a hypervisor snapshot that a revert really goes back to.

The backend's snapshot mode runs the whole contract on top of these; this checks the template and
portable.py alone. The guest's files go where libvirt's QEMU user can read them (its images
directory), so this needs root.
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

from pytest_vmfixtures.backends.libvirt import portable
from pytest_vmfixtures.backends.libvirt.convert import converted_disk
from pytest_vmfixtures.backends.libvirt.drivers import driver_for, portable_domain_xml, require_firmware_boot
from pytest_vmfixtures.channels.ssh import SSH, SSHError
from pytest_vmfixtures.command import new_tag
from pytest_vmfixtures.errors import CommandTimeout, GuestError
from pytest_vmfixtures.images.cache import Cache
from pytest_vmfixtures.images.image import BuiltImage
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
        rig_missing("the guest's files must go to libvirt's images directory, which needs root")
    conn = libvirt.open(primary_uri)
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture(scope="module")
def network(conn: Any) -> Iterator[str]:
    subnet = free_subnet(conn)
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


def guest_address(domain: Any) -> str:
    def leased() -> str | None:
        try:
            interfaces = domain.interfaceAddresses(libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, 0)
        except libvirt.libvirtError:
            return None
        return next((str(a["addr"]) for i in interfaces.values() for a in i.get("addrs") or []), None)

    address: str = wait_for(f"a DHCP lease for {domain.name()}", leased, BOOT_TIMEOUT, interval=0.5, max_interval=2.0)
    return address


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


def test_a_cloud_guest_is_reverted_to_its_clean_snapshot(conn: Any, network: str, cloud_image: BuiltImage,
                                                         cache: Cache, files: Path) -> None:
    driver = driver_for(conn.getURI())
    require_firmware_boot(cloud_image, driver)
    # libvirt's QEMU user must read the whole chain: the image's disk is copied next to the overlay.
    base = files / "base.qcow2"
    shutil.copyfile(converted_disk(cache, cloud_image, driver.disk_format), base)
    overlay = files / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", cloud_image.disk_format, "-b", str(base),
                    str(overlay)], check=True, timeout=60)
    assert cloud_image.seed is not None
    shutil.copyfile(cloud_image.seed, files / "seed.iso")
    domain = portable.define_from_template(
        conn, driver, name=TAG, memory_mb=512, cpus=1, disk=str(overlay), mac="52:54:00:7e:57:01", network=network,
        firmware=cloud_image.firmware, seed=str(files / "seed.iso"), domain_type="qemu")
    ssh: SSH | None = None
    try:
        started = time.monotonic()
        portable.start(domain)
        address = guest_address(domain)
        ssh = SSH(address, 22, cloud_image.user, paramiko.Ed25519Key.from_private_key_file(str(cloud_image.client_key)),
                  cloud_image.host_key, TAG)
        run(ssh, "cloud-init status --wait >/dev/null; true")
        print(f"\n  booted to SSH at {address} in {time.monotonic() - started:.1f} s")

        clean = portable.take_clean_snapshot(domain)
        assert run(ssh, "sudo -n touch /root/dirty && sudo -n ls /root") == "dirty\n"
        for _ in range(2):
            reverting = time.monotonic()
            portable.revert(domain, clean)
            reverted = time.monotonic() - reverting
            ssh.close()
            assert run(ssh, "sudo -n ls -A /root | grep -c dirty || true") == "0\n"
            print(f"  revert {reverted:.2f} s, to the first command after it {time.monotonic() - reverting:.2f} s")
    finally:
        if ssh is not None:
            ssh.close()
        assert portable.remove(domain) == []
    assert TAG not in [d.name() for d in conn.listAllDomains(0)]


def test_a_uefi_guest_has_no_clean_snapshot_and_nothing_is_left(conn: Any, network: str, files: Path) -> None:
    """libvirt 9.0 refuses internal snapshots with pflash firmware: why the portable path runs BIOS images.
    The domain here boots nothing (an empty disk); what matters is the refusal and the cleanup."""
    disk = files / "empty.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True, timeout=60)
    xml = portable_domain_xml(driver_for(conn.getURI()), name=f"{TAG}-uefi", memory_mb=256, cpus=1,
                                       disk=str(disk), mac="52:54:00:7e:57:02", network=network, firmware="bios",
                                       domain_type="qemu")
    xml = xml.replace("<os>", "<os firmware='efi'>", 1)  # what the template would say for UEFI
    domain = conn.defineXML(xml)
    try:
        portable.start(domain)
        if conn.getLibVersion() < 10_000_000:
            with pytest.raises(GuestError, match="internal snapshots of a VM with pflash based firmware are not supported"):
                portable.take_clean_snapshot(domain)
    finally:
        assert portable.remove(domain) == []  # undefined with its NVRAM
    assert f"{TAG}-uefi" not in [d.name() for d in conn.listAllDomains(0)]
