"""A hypervisor reached over qemu+ssh://, for real: libvirt's ssh transport, and the guests' SSH through
``ssh -W`` via that host (a throwaway sshd on 127.0.0.2 in front of the second libvirtd)."""

from __future__ import annotations

import subprocess

from rig import import_libvirt

from pytest_vmfixtures.accel import AccelChoice
from pytest_vmfixtures.backends.base import MachineConfig
from pytest_vmfixtures.backends.libvirt import LibvirtBackend, LibvirtMachine
from pytest_vmfixtures.images.cache import Cache
from pytest_vmfixtures.images.catalog import BUILTIN_IMAGES_DIR
from pytest_vmfixtures.pool import Pool
from pytest_vmfixtures.runtime import Runtime

import_libvirt()
CONFIG = MachineConfig("debian-12")


def test_guest_on_a_qemu_ssh_host_runs_reverts_and_is_reached_through_ssh_w(
    cache: Cache, accel: AccelChoice, ssh_uri: str
) -> None:
    runtime = Runtime(cache.root, "libvirt-ssh-tests")
    pool = Pool(LibvirtBackend(runtime, accel, [ssh_uri]), cache, runtime, [BUILTIN_IMAGES_DIR], accel=accel.accel)
    prefix = f"vmfx-{runtime.session_id}-"
    try:
        vm = pool.acquire(CONFIG)
        machine = vm._instance.machine
        assert isinstance(machine, LibvirtMachine)
        assert machine.ssh_proxy is not None and "-W 127.0.0.1:" in machine.ssh_proxy
        assert vm.run("touch /tmp/dirty; cat /etc/hostname").stdout.strip() == "debian-12"  # agent via libvirt
        _, out, _ = vm.ssh.exec_command("echo through-the-hypervisor")  # paramiko over ssh -W
        assert out.read().decode().strip() == "through-the-hypervisor"
        assert "ProxyCommand=" in vm.ssh_command()
        pool.release(vm)
        vm = pool.acquire(CONFIG)
        assert vm.run("test -e /tmp/dirty").returncode == 1, "the guest was not reverted"
        pool.release(vm)
    finally:
        pool.close()
        runtime.close()
    names = subprocess.run(["virsh", "-q", "-c", ssh_uri, "list", "--all", "--name"], capture_output=True,
                           text=True, timeout=60).stdout.split()
    assert [n for n in names if n.startswith(prefix)] == []
