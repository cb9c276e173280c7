"""A libvirt host that does not share this machine's files, for real.

The second libvirtd (second_libvirtd.sh) is reached through libvirt's "ext"
transport, so the backend treats it as a remote hypervisor: no descriptor
passing, and a storage pool on a tmpfs that only that daemon's mount namespace
sees. Images, kernels and saved states get there only by upload.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from rig import import_libvirt

from pytest_vmfixtures.accel import AccelChoice
from pytest_vmfixtures.backends.base import MachineConfig
from pytest_vmfixtures.backends.libvirt import CLIENT, LibvirtBackend, LibvirtMachine
from pytest_vmfixtures.backends.libvirt.storage import DONE, HostStorage, LocalFile
from pytest_vmfixtures.doctor import FAIL, OK, check_libvirt
from pytest_vmfixtures.errors import GuestError
from pytest_vmfixtures.guest import GuestState
from pytest_vmfixtures.images.cache import Cache
from pytest_vmfixtures.images.catalog import BUILTIN_IMAGES_DIR
from pytest_vmfixtures.pool import Pool
from pytest_vmfixtures.runtime import Runtime
from pytest_vmfixtures.waiting import wait_for

libvirt = import_libvirt()
CONFIG = MachineConfig("debian-12")


def virsh_names(uri: str, *listing: str) -> list[str]:
    """The first column of a virsh listing, as a person would read it."""
    out = subprocess.run(["virsh", "-q", "-c", uri, *listing], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def domains(uri: str) -> list[str]:
    return virsh_names(uri, "list", "--all", "--name")


def volumes(uri: str) -> list[str]:
    return virsh_names(uri, "vol-list", "vmfixtures")


def make(cache: Cache, accel: AccelChoice, uris: list[str], messages: list[str], provision_key: str = "") -> Pool:
    """A pool on ``uris`` that reports its progress into ``messages``; close() it."""
    runtime = Runtime(cache.root, "libvirt-remote-tests")
    backend = LibvirtBackend(runtime, accel, uris, progress=messages.append)
    return Pool(backend, cache, runtime, [BUILTIN_IMAGES_DIR], accel=accel.accel, progress=messages.append,
                provision_key=provision_key)


def close(pool: Pool) -> None:
    pool.close()
    pool.runtime.close()


@pytest.fixture(scope="module")
def remote_pool(cache: Cache, accel: AccelChoice, remote_uri: str) -> Iterator[Pool]:
    pool = make(cache, accel, [remote_uri], [])
    try:
        yield pool
    finally:
        close(pool)


def test_guest_on_a_remote_host_runs_reverts_and_answers_ssh(remote_pool: Pool, remote_uri: str) -> None:
    vm = remote_pool.acquire(CONFIG)
    machine = vm._instance.machine
    assert isinstance(machine, LibvirtMachine) and machine.host.storage is not None
    assert machine.domain_name in domains(remote_uri)
    assert vm.run("touch /tmp/dirty; rm -rf /etc/ssh/sshd_config.d; cat /etc/hostname").stdout.strip() == "debian-12"
    remote_pool.release(vm)
    vm = remote_pool.acquire(CONFIG)
    assert vm.run("test -e /tmp/dirty").returncode == 1, "the guest was not reverted"
    assert vm.ssh.exec_command("echo over-ssh")[1].read().decode().strip() == "over-ssh"
    # The overlay is a volume in the host's pool, which this machine cannot see.
    overlay = vm._instance.machine.overlay  # type: ignore[attr-defined]
    assert overlay.startswith("/var/lib/libvirt/vmfixtures/") and not Path(overlay).exists()
    remote_pool.release(vm)


def test_uploads_are_kept_on_the_host_by_digest(cache: Cache, accel: AccelChoice, remote_uri: str,
                                               remote_pool: Pool) -> None:
    remote_pool.acquire(CONFIG).kill()  # the image and state are on the host by now
    messages: list[str] = []
    pool = make(cache, accel, [remote_uri], messages)
    try:
        vm = pool.acquire(CONFIG)
        assert vm.run("true").ok
    finally:
        close(pool)
    assert not [m for m in messages if m.startswith("copying")], messages
    names = volumes(remote_uri)
    shared = [n for n in names if n.startswith(("vmfx-img-", "vmfx-state-")) and not n.endswith(DONE)]
    assert {n.rsplit(".", 1)[1] for n in shared} >= {"qcow2", "vmlinuz", "initrd"}
    assert all(n + DONE in names for n in shared)


def test_closing_leaves_no_domain_and_no_run_volume_on_the_host(cache: Cache, accel: AccelChoice,
                                                               remote_uri: str) -> None:
    pool = make(cache, accel, [remote_uri], [])
    prefix = f"vmfx-{pool.runtime.session_id}-"
    try:
        vm = pool.acquire(CONFIG)
        vm.run("true", check=True)
        assert any(n.startswith(prefix) for n in domains(remote_uri))
        assert any(n.startswith(prefix) for n in volumes(remote_uri))  # its overlay and RAM copies
    finally:
        close(pool)
    assert [n for n in domains(remote_uri) if n.startswith(prefix)] == []
    assert [n for n in volumes(remote_uri) if n.startswith(prefix)] == []


def test_state_made_on_a_remote_host_comes_home_and_loads_on_the_local_one(
    cache: Cache, accel: AccelChoice, remote_uri: str, primary_uri: str
) -> None:
    messages: list[str] = []
    key = f"remote-made-{uuid.uuid4().hex[:8]}"
    pool = make(cache, accel, [remote_uri], messages, provision_key=key)
    try:
        vm = pool.acquire(CONFIG)  # no state for this key anywhere: boots on the remote host, saves there
        assert vm.run("cat /etc/hostname").stdout.strip() == "debian-12"
        state = pool._slot(CONFIG).state
        assert state.memory.stat().st_uid == os.getuid()
        backing = subprocess.run(["qemu-img", "info", "--output=json", str(state.disk)], capture_output=True,
                                 text=True, check=True).stdout
        assert f'"backing-filename": "{pool.image(CONFIG.image).disk}"' in backing
        pool.release(vm)
    finally:
        close(pool)
    assert any("booting" in m for m in messages)
    local = make(cache, accel, [primary_uri], [], provision_key=key)
    try:
        vm = local.acquire(CONFIG)
        assert local._slot(CONFIG).state.key == state.key
        assert vm.run("cat /etc/hostname").stdout.strip() == "debian-12"
        assert vm.state is GuestState.DIRTY
    finally:
        close(local)
        cache.discard(state.directory, cache.generation(state.directory))


def test_a_remote_guest_console_is_streamed_here(remote_pool: Pool) -> None:
    vm = remote_pool.acquire(CONFIG)
    try:
        vm.run("echo remote-console-marker > /dev/ttyS0", check=True)
        wait_for("the marker in the local console.log",
                 lambda: "remote-console-marker" in vm.console_log.read_text(errors="replace") or None, 30.0)
    finally:
        remote_pool.release(vm)


def test_host_without_the_pool_is_a_clear_error(cache: Cache, accel: AccelChoice, remote_uri: str) -> None:
    runtime = Runtime(cache.root, "libvirt-remote-tests")
    try:
        with pytest.raises(GuestError, match=r"has no storage pool 'no-such-pool'.*virsh pool-define-as no-such-pool"):
            LibvirtBackend(runtime, accel, [remote_uri], pool="no-such-pool")
    finally:
        runtime.close()


def test_an_abandoned_upload_is_replaced(remote_uri: str, tmp_path: Path) -> None:
    conn = libvirt.open(remote_uri)
    try:
        storage = HostStorage(conn, remote_uri)
        storage.stalled_s = 2.0
        name = f"vmfx-test-{CLIENT}-{uuid.uuid4().hex[:8]}"
        storage.upload(name, [b"half"], 4)  # no .done marker: as if the uploader was killed
        content = os.urandom(3 << 20)
        (tmp_path / "content").write_bytes(content)
        messages: list[str] = []
        storage.ensure(name, LocalFile(tmp_path / "content"), messages.append)
        storage.download(name, tmp_path / "back")
        assert (tmp_path / "back").read_bytes() == content
        assert any("stopped growing" in m for m in messages)
        assert name + DONE in storage.names()
    finally:
        for n in (name, name + DONE):
            storage.delete(n)
        conn.close()


def overwrite(storage: HostStorage, name: str, data: bytes) -> None:
    """Write ``data`` over volume ``name`` in place, as anyone who can write the pool can."""
    stream = storage.conn.newStream(0)
    storage.pool.storageVolLookupByName(name).upload(stream, 0, len(data), 0)
    stream.send(data)
    stream.finish()


def plant(storage: HostStorage, name: str, data: bytes) -> None:
    """Put ``data`` under ``name``, marked finished: a copy someone else made, or replaced."""
    storage.delete(name + DONE)
    storage.delete(name)
    storage.upload(name, [data], len(data))
    storage.upload(name + DONE, [], 0)


@pytest.mark.parametrize("tamper", ["bytes-changed-in-place", "copy-planted-under-the-name"])
def test_a_shared_copy_that_does_not_match_its_digest_is_replaced(remote_uri: str, tmp_path: Path, tamper: str) -> None:
    """A finished copy is trusted by its bytes, not its name and .done marker: each run reads it back once."""
    conn = libvirt.open(remote_uri)
    name = f"vmfx-test-{CLIENT}-{uuid.uuid4().hex[:8]}"
    good = tmp_path / "good"
    content = os.urandom(3 << 20)
    good.write_bytes(content)
    try:
        first = HostStorage(conn, remote_uri)
        first.ensure(name, LocalFile(good), [].append)
        if tamper == "bytes-changed-in-place":  # same size, .done left alone
            overwrite(first, name, content[:-1] + bytes([content[-1] ^ 1]))
        else:
            plant(first, name, b"something else entirely")
        messages: list[str] = []
        later = HostStorage(conn, remote_uri)  # a later run: nothing known about the pool yet
        path = later.ensure(name, LocalFile(good), messages.append)
        assert any("does not hold what its name says" in m for m in messages), messages
        assert later.uploads == 1 and name + DONE in later.names()
        later.download(name, tmp_path / "back")
        assert (tmp_path / "back").read_bytes() == content
        messages.clear()
        assert later.ensure(name, LocalFile(good), messages.append) == path
        assert messages == [], "checked once per run, not per use"
        again = HostStorage(conn, remote_uri)  # the right copy is kept: checked, not copied again
        again.ensure(name, LocalFile(good), messages.append)
        assert again.uploads == 0 and [m for m in messages if m.startswith("checking")], messages
    finally:
        for n in (name, name + DONE):
            HostStorage(conn, remote_uri).delete(n)
        conn.close()


@pytest.fixture
def spare_pool(remote_uri: str) -> Iterator[str]:
    """A second storage pool on the remote host, so this module's other pool never sees its copies."""
    conn = libvirt.open(remote_uri)
    name = f"vmfx-tamper-{uuid.uuid4().hex[:8]}"
    xml = f"<pool type='dir'><name>{name}</name><target><path>/var/lib/libvirt/{name}</path></target></pool>"
    pool = conn.storagePoolCreateXML(xml, libvirt.VIR_STORAGE_POOL_CREATE_WITH_BUILD)
    try:
        yield name
    finally:
        pool.refresh(0)
        for volume in pool.listAllVolumes(0):
            volume.delete(0)
        pool.destroy()
        conn.close()


def test_a_guest_never_boots_a_planted_image_copy(cache: Cache, accel: AccelChoice, remote_uri: str,
                                                  spare_pool: str) -> None:
    """Whoever can write the pool plants bytes of their own as the image's copy, marked finished: the
    next run finds them out by the image's sha256, copies the image again, and its guest runs on that."""
    messages: list[str] = []
    runtime = Runtime(cache.root, "libvirt-remote-tests")
    backend = LibvirtBackend(runtime, accel, [remote_uri], pool=spare_pool, progress=messages.append)
    pool = Pool(backend, cache, runtime, [BUILTIN_IMAGES_DIR], accel=accel.accel, progress=messages.append)
    try:
        image = pool.image(CONFIG.image)
        storage = backend.hosts[0].storage
        assert storage is not None
        name = f"vmfx-img-{image.disk_sha256[:16]}.qcow2"
        plant(storage, name, b"QFI\xfb" + os.urandom(1 << 20))
        vm = pool.acquire(CONFIG)
        assert vm.run("cat /etc/hostname").stdout.strip() == "debian-12"
        assert any(name in m and "does not hold what its name says" in m for m in messages), messages
        assert any(m.startswith(f"copying {name}") for m in messages), messages
        assert storage.sha256(storage.pool.storageVolLookupByName(name)) == image.disk_sha256
        pool.release(vm)
    finally:
        close(pool)


def test_doctor_checks_a_remote_hosts_pool(remote_uri: str) -> None:
    ok = {c.name: c for c in check_libvirt([remote_uri])}
    assert ok["libvirt pool"].status == OK
    missing = {c.name: c for c in check_libvirt([remote_uri], pool="no-such-pool")}
    assert missing["libvirt pool"].status == FAIL
    assert "virsh pool-define-as no-such-pool" in missing["libvirt pool"].message
    assert "libvirt pool" not in {c.name for c in check_libvirt(["qemu:///system"])}  # a local host needs none
