"""Every catalog image boots and keeps the plugin's promises: facts, commands, files, revert.

Each test names its image to ``vm_factory``, so every image runs whatever
``--vm-image`` says; ``-k tiny`` (say) picks images. On a cold cache each
image is built and cold-booted once (about a minute each under emulation,
seconds for tiny), then every test gets a restored guest.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pytest_vmfixtures.images.image import GuestOS

# Pinned, so that the --vm-image matrix does not repeat these tests once per
# image: each test picks its own image with vm_factory(image=...).
pytestmark = pytest.mark.vm(image="debian-12")

# What the guest itself reports (os-release, PID 1, the package manager found),
# and its architecture as image.json and uname see it.
# The other architectures' images take minutes to build: scripts/test runs them with --vm-image.
EXPECTED = {
    "debian-12": (GuestOS("debian", "12", "systemd", "apt", "x86_64"), "x86_64", "x86_64"),
    "debian-12-i386": (GuestOS("debian", "12", "systemd", "apt", "i686"), "i386", "i686"),
    "debian-12-sysv": (GuestOS("debian", "12", "sysvinit", "apt", "x86_64"), "x86_64", "x86_64"),
    "debian-12-openrc": (GuestOS("debian", "12", "openrc", "apt", "x86_64"), "x86_64", "x86_64"),
    "debian-13": (GuestOS("debian", "13", "systemd", "apt", "x86_64"), "x86_64", "x86_64"),
    "tiny": (GuestOS("tiny", "1", "busybox", "none", "x86_64"), "x86_64", "x86_64"),
}
IMAGES = sorted(EXPECTED)
# vm.os.init is read from the running guest: check it against the real thing another way.
PID1_IS = {
    "systemd": 'test "$(cat /proc/1/comm)" = systemd',
    "sysvinit": "dpkg -s sysvinit-core >/dev/null && test ! -d /run/systemd/system && ! dpkg -s openrc >/dev/null 2>&1",
    "openrc": "test \"$(cat /proc/1/comm)\" = init && rc-status --runlevel >/dev/null && rc-service ssh status",
    "busybox": 'test "$(readlink /sbin/init)" = /usr/bin/busybox',
}


@pytest.mark.parametrize("image", IMAGES)
def test_facts_and_channels(vm_factory, image: str, tmp_path: Path) -> None:
    vm = vm_factory(image=image)
    guest_os, arch, machine = EXPECTED[image]
    assert vm.os == guest_os
    assert vm.built_image.arch == arch
    assert vm.run("uname -m", check=True).stdout.strip() == machine
    assert vm.run(PID1_IS[guest_os.init]).ok
    assert vm.built_image.agent, "every catalog image runs the QEMU guest agent"
    result = vm.run("echo out; echo err >&2; exit 3")
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
    payload = bytes(range(256)) * 300
    (tmp_path / "up.bin").write_bytes(payload)
    vm.put(tmp_path / "up.bin", "/var/tmp/up.bin")
    assert vm.run("sha256sum /var/tmp/up.bin", check=True).stdout.split()[0] == hashlib.sha256(payload).hexdigest()
    vm.get("/var/tmp/up.bin", tmp_path / "down.bin")
    assert (tmp_path / "down.bin").read_bytes() == payload


@pytest.mark.parametrize("image", IMAGES)
def test_wreck(vm_factory, image: str) -> None:
    vm = vm_factory(image=image)
    vm.run("echo dirty > /var/tmp/marker; rm -rf /etc /root; sync", timeout=300)
    assert not vm.run("test -e /etc/passwd").ok


@pytest.mark.parametrize("image", IMAGES)
def test_wreck_is_reverted(vm_factory, image: str, tmp_path: Path) -> None:
    vm = vm_factory(image=image)
    assert vm.run("test -e /etc/passwd && test -d /root && test ! -e /var/tmp/marker").ok
    # SFTP logs in with root's authorized key and the host key under /etc: both came back.
    (tmp_path / "f").write_text("back\n")
    vm.put(tmp_path / "f", "/root/f")
    assert vm.run("cat /root/f", check=True).stdout == "back\n"
