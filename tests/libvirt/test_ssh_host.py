"""A hypervisor reached over qemu+ssh://, for real: libvirt's ssh transport, and the guests' SSH through
``ssh -W`` via that host (a throwaway sshd on 127.0.0.2 in front of the second libvirtd), which checks the
host's key against the known_hosts file the URI names."""

from __future__ import annotations

import subprocess
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import paramiko
import pytest
from rig import import_libvirt

from pytest_vmfixtures.accel import AccelChoice
from pytest_vmfixtures.backends.base import MachineConfig
from pytest_vmfixtures.backends.libvirt import LibvirtBackend, LibvirtMachine, ssh_route
from pytest_vmfixtures.channels.ssh import SSH, HostKeyError
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


def with_known_hosts(uri: str, path: Path) -> str:
    parts = urlsplit(uri)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "known_hosts"] + [("known_hosts", str(path))]
    return urlunsplit(parts._replace(query=urlencode(query, safe="/")))


@pytest.mark.parametrize("known", ["another key", "no key"])
def test_a_hypervisor_whose_host_key_is_not_the_known_one_is_refused(ssh_uri: str, tmp_path: Path, known: str) -> None:
    """The route to a guest never reaches a machine whose key is not the hypervisor's known one (no guest needed:
    the refusal comes before any forward)."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "key")], check=True)
    hosts = tmp_path / "known_hosts"
    public = (tmp_path / "key.pub").read_text().split()
    hosts.write_text(f"[127.0.0.2]:2222 {public[0]} {public[1]}\n" if known == "another key" else "")
    route = ssh_route(with_known_hosts(ssh_uri, hosts), 22)
    assert route is not None and "StrictHostKeyChecking=yes" in route
    key = paramiko.Ed25519Key.from_private_key_file(str(tmp_path / "key"))
    channel = SSH("127.0.0.1", 22, "root", key, " ".join(public[:2]), "guest-1", route)
    with pytest.raises(HostKeyError, match="known_hosts=FILE in the libvirt URI") as info:
        channel.connect(timeout=20)
    assert "\n" not in str(info.value)
