"""The pure parts of the libvirt backend's remote-host support: URI reading, save-image rewrapping, copy checks."""

from __future__ import annotations

import functools
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pytest_vmfixtures.backends.libvirt import qcow2_virtual_size, shares_files, ssh_route
from pytest_vmfixtures.backends.libvirt.calls import libvirt
from pytest_vmfixtures.backends.libvirt.names import OWNED
from pytest_vmfixtures.backends.libvirt.save import SAVE_HEADER, SAVE_MAGIC, rewrap, stream_offset
from pytest_vmfixtures.backends.libvirt.storage import DONE, HostStorage, LocalFile, volume_xml
from pytest_vmfixtures.channels.ssh import ProxyProcess
from pytest_vmfixtures.errors import GuestError, ImageError, SnapshotError


@pytest.mark.parametrize(("uri", "shared"), [
    ("qemu:///system", True),
    ("qemu:///session", True),
    ("qemu+unix:///system?socket=/srv/l2/sock", True),
    ("qemu:///system?socket=/srv/l2/sock", True),
    ("qemu+ssh://hv1/system", False),
    ("qemu+tcp://127.0.0.1:16509/system", False),  # loops back, but no descriptor passes over TCP
    ("qemu+ext:///system?command=/usr/local/bin/hv-tunnel", False),
    ("qemu://hv1/system", False),  # TLS
])
def test_only_unix_socket_uris_share_this_machines_files(uri: str, shared: bool) -> None:
    assert shares_files(uri) is shared


def test_ssh_reaches_a_remote_guest_through_the_hypervisor() -> None:
    checked = "ssh -o BatchMode=yes -o StrictHostKeyChecking=yes"
    assert ssh_route("qemu+ssh://ci@hv1:2222/system", 40123) == f"{checked} -W 127.0.0.1:40123 -p 2222 -l ci hv1"
    assert ssh_route("qemu+libssh2://hv2/system", 40000) == f"{checked} -W 127.0.0.1:40000 hv2"
    # libvirt's keyfile and known_hosts parameters apply to the guest's route too; its no_verify=1 does not.
    assert ssh_route("qemu+ssh://hv1/system?keyfile=/k/id&no_verify=1&known_hosts=/k/hosts", 1) == (
        f"{checked} -W 127.0.0.1:1 -i /k/id -o UserKnownHostsFile=/k/hosts hv1"
    )


def test_ssh_to_a_loopback_host_goes_direct() -> None:
    assert ssh_route("qemu+ext:///system?command=/x", 40123) is None
    assert ssh_route("qemu+tcp://127.0.0.1/system", 40123) is None


def test_a_remote_host_ssh_cannot_reach_is_refused_with_the_uri_to_use() -> None:
    with pytest.raises(GuestError, match=r"use qemu\+ssh://hv3/system for it"):
        ssh_route("qemu+tcp://hv3/system", 40123)


def _save_image(path: Path, xml: bytes, cookie: bytes, stream: bytes, pad: int = 37) -> None:
    data = xml + b"\0" + cookie + b"\0" + b"\0" * pad  # libvirt pads the data before the stream
    header = SAVE_HEADER.pack(SAVE_MAGIC, 2, len(data), 1, 0, len(xml) + 1)
    path.write_bytes(header + data + stream)


def test_rewrap_puts_new_xml_before_the_same_stream(tmp_path: Path) -> None:
    original = tmp_path / "memory"
    stream = b"QEVM" + bytes(range(256)) * 4000
    _save_image(original, b"<domain><uuid>old</uuid></domain>", b"<cookie/>", stream)
    xml = "<domain><uuid>new-and-longer</uuid></domain>"
    copy = tmp_path / "copy"
    chunks, size = rewrap(original, xml)
    copy.write_bytes(b"".join(chunks))
    assert copy.stat().st_size == size
    offset = stream_offset(copy)
    assert copy.read_bytes()[offset:] == stream
    header = copy.read_bytes()[:SAVE_HEADER.size]
    _magic, version, data_len, running, compressed, cookie_at = SAVE_HEADER.unpack(header)
    data = copy.read_bytes()[SAVE_HEADER.size:SAVE_HEADER.size + data_len]
    assert (version, running, compressed) == (2, 1, 0)
    assert data[:cookie_at] == xml.encode() + b"\0"
    assert data[cookie_at:] == b"<cookie/>\0"


def test_rewrap_refuses_what_is_not_a_save_image(tmp_path: Path) -> None:
    bogus = tmp_path / "memory"
    bogus.write_bytes(struct.pack("<16s", b"NotASaveImage!!!") + b"\0" * 200)
    with pytest.raises(SnapshotError, match="not a libvirt save image"):
        rewrap(bogus, "<domain/>")


def test_qcow2_virtual_size_reads_the_header(tmp_path: Path) -> None:
    disk = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "3G"], check=True)
    assert qcow2_virtual_size(disk) == 3 << 30
    raw = tmp_path / "d.raw"
    raw.write_bytes(b"\0" * 64)
    with pytest.raises(ImageError, match="not a qcow2 image"):
        qcow2_virtual_size(raw)


def test_volume_xml_escapes_and_names_the_backing_store() -> None:
    xml = volume_xml("vmfx-a&b.qcow2", 1024, "qcow2", "/pool/vmfx-img-1.qcow2")
    assert "<name>vmfx-a&amp;b.qcow2</name>" in xml
    assert "<backingStore><path>/pool/vmfx-img-1.qcow2</path><format type='qcow2'/></backingStore>" in xml
    assert "<mode>0600</mode>" in xml


def test_run_owned_volumes_name_the_process_and_the_machine() -> None:
    match = OWNED.match("vmfx-4242-0123abcd-89abcdef-debian-12-1.qcow2")
    assert match is not None and match.groups() == ("4242-0123abcd", "89abcdef")  # the session id, the client tag
    assert OWNED.match("vmfx-img-0123456789abcdef.qcow2") is None
    assert OWNED.match("vmfx-state-debian-12-0123456789abcdef.qcow2") is None


def test_proxy_process_is_a_socket_to_the_command_and_is_reaped() -> None:
    proxy = ProxyProcess("cat")  # stands in for ssh -W: what goes in comes back
    proxy.sock.sendall(b"hello")
    assert proxy.sock.recv(5) == b"hello"
    proxy.close()
    assert proxy.process.returncode is not None


def test_proxy_process_keeps_what_the_command_said() -> None:
    proxy = ProxyProcess("sh -c 'echo Permission denied >&2'")
    proxy.process.wait(10)
    assert proxy.errors() == "Permission denied"
    proxy.close()


# HostStorage's check of shared copies, against a pool of libvirt's shape held in memory (the real
# pool's tests are in tests/libvirt/test_remote.py); here what a real pool cannot easily be made to do.


class FakeStream:
    def __init__(self) -> None:
        self.sink: bytearray | None = None
        self.source = b""

    def send(self, data: bytes) -> int:
        assert self.sink is not None
        self.sink += data
        return len(data)

    def recv(self, n: int) -> bytes:
        data, self.source = self.source[:n], self.source[n:]
        return data

    def finish(self) -> None:
        pass

    def abort(self) -> None:
        pass


class FakeVolume:
    def __init__(self, pool: FakePool, name: str) -> None:
        self.pool, self.name = pool, name

    def path(self) -> str:
        return f"/pool/{self.name}"

    def info(self) -> list[int]:
        return [0, len(self.pool.volumes[self.name]), len(self.pool.volumes[self.name])]

    def upload(self, stream: FakeStream, offset: int, length: int, flags: int) -> None:
        stream.sink = self.pool.volumes[self.name] = bytearray()

    def download(self, stream: FakeStream, offset: int, length: int, flags: int) -> None:
        self.pool.reading(self.name)
        if self.name not in self.pool.volumes:
            raise libvirt.libvirtError("no such volume")
        stream.source = bytes(self.pool.volumes[self.name])

    def delete(self, flags: int) -> None:
        self.pool.volumes.pop(self.name, None)


class FakePool:
    def __init__(self) -> None:
        self.volumes: dict[str, bytearray] = {}

    def reading(self, name: str) -> None:
        """Called as a volume is read back."""

    def creating(self, name: str) -> None:
        """Called as a volume is about to be created."""

    def isActive(self) -> bool:  # noqa: N802 - libvirt's names
        return True

    def XMLDesc(self, flags: int) -> str:  # noqa: N802
        return "<pool><target><path>/pool</path></target></pool>"

    def storageVolLookupByName(self, name: str) -> FakeVolume:  # noqa: N802
        if name not in self.volumes:
            raise libvirt.libvirtError("no such volume")
        return FakeVolume(self, name)

    def createXML(self, xml: str, flags: int) -> FakeVolume:  # noqa: N802
        name = xml.split("<name>")[1].split("</name>")[0]
        self.creating(name)
        if name in self.volumes:
            raise libvirt.libvirtError("exists")
        self.volumes[name] = bytearray()
        return FakeVolume(self, name)


class FakeConn:
    def __init__(self, pool: FakePool) -> None:
        self.pool = pool

    def storagePoolLookupByName(self, name: str) -> FakePool:  # noqa: N802
        return self.pool

    def newStream(self, flags: int) -> FakeStream:  # noqa: N802
        return FakeStream()


@pytest.fixture
def libvirt_module() -> object:
    return pytest.importorskip("libvirt", reason="libvirt-python is not installed")


def test_a_pool_that_keeps_getting_wrong_copies_is_an_error_not_a_loop(libvirt_module: object, tmp_path: Path) -> None:
    source = tmp_path / "good"
    source.write_bytes(b"the image")
    pool = FakePool()

    def plant(name: str = "v") -> None:  # someone else always puts a wrong copy there first
        if name == "v":
            pool.volumes.update({"v": bytearray(b"evil"), "v" + DONE: bytearray()})

    plant()
    pool.creating = plant  # type: ignore[method-assign]
    storage = HostStorage(FakeConn(pool), "qemu+ssh://hv/system")
    messages: list[str] = []
    with pytest.raises(GuestError, match="held wrong bytes 3 times in this run.*keeps writing the storage pool"):
        storage.ensure("v", LocalFile(source), messages.append)
    assert len([m for m in messages if "does not hold what its name says" in m]) == 3


def test_a_copy_replaced_while_it_is_read_back_is_looked_up_again(libvirt_module: object, tmp_path: Path) -> None:
    source = tmp_path / "good"
    source.write_bytes(b"the image")
    pool = FakePool()
    pool.volumes.update({"v": bytearray(b"old"), "v" + DONE: bytearray()})
    vanish = [True]

    def reading(name: str) -> None:  # another run deletes it under our read, once
        if vanish and name == "v":
            vanish.clear()
            pool.volumes.pop("v" + DONE)
            pool.volumes.pop("v")

    pool.reading = reading  # type: ignore[method-assign]
    storage = HostStorage(FakeConn(pool), "qemu+ssh://hv/system")
    messages: list[str] = []
    assert storage.ensure("v", LocalFile(source), messages.append) == "/pool/v"
    assert bytes(pool.volumes["v"]) == b"the image" and "v" + DONE in pool.volumes
    assert not [m for m in messages if "does not hold" in m] and storage.uploads == 1


def test_a_stalled_copy_that_cannot_be_deleted_is_an_error_not_a_loop(
    libvirt_module: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """L5: another client's upload stopped growing and libvirt refuses to delete it (still open): the FAKE
    pool's delete fails. Before, the wait looked again every stalled_s, forever."""
    source = tmp_path / "good"
    source.write_bytes(b"the image")
    pool = FakePool()
    pool.volumes["v"] = bytearray(b"half")

    def refuse(self: FakeVolume, flags: int) -> None:
        raise libvirt.libvirtError("storage volume 'v' is still in use")

    monkeypatch.setattr(FakeVolume, "delete", refuse)
    storage = HostStorage(FakeConn(pool), "qemu+ssh://hv/system")
    storage.stalled_s, storage.ensure_s = 0.05, 0.5
    with pytest.raises(GuestError, match=r"v was not ready after 0.5 s: .*virsh -c qemu\+ssh://hv/system "
                                         r"vol-delete --pool vmfixtures v$"):
        storage.ensure("v", LocalFile(source), lambda message: None)


class HungDomain:
    """A FAKE libvirt domain whose isActive and state never answer (a stuck libvirtd cannot be made on demand)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def name(self) -> str:
        return "vmfx-hung-1"

    def isActive(self) -> int:  # noqa: N802 - libvirt's names
        self.release.wait(60)
        return 1

    def state(self) -> list[int]:
        self.release.wait(60)
        return [1, 0]


def test_alive_and_state_of_a_domain_libvirt_does_not_answer_for_are_bounded(
    libvirt_module: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pytest_vmfixtures.backends.libvirt import machine as machine_module
    from pytest_vmfixtures.backends.libvirt.connection import Host

    monkeypatch.setattr(machine_module, "STATE_CALL_SECONDS", 0.2)
    domain = HungDomain()
    host = Host("qemu:///system", object(), "9.0.0", "7.2.0")
    machine = machine_module.LibvirtMachine(host, domain, "debian-12-1", tmp_path, 40000, "<domain/>", False,
                                            tmp_path / "disk", str(tmp_path / "overlay"), on_stop=lambda m: None)
    try:
        assert machine.alive() is False
        assert machine.state() == "unknown (libvirt did not answer)"
        assert "did not answer within 0.2 s" in machine.exit_description()
    finally:
        domain.release.set()


def test_a_restore_that_completes_after_its_deadline_is_dropped_and_its_copy_freed(libvirt_module: object) -> None:
    """L5: restoreFlags answering late leaves a paused domain nobody holds. The connection is a FAKE."""
    from pytest_vmfixtures.backends.libvirt.calls import bounded
    from pytest_vmfixtures.backends.libvirt.connection import Host
    from pytest_vmfixtures.backends.libvirt.saved_state import drop_late_restore
    from pytest_vmfixtures.backends.libvirt.storage import StateCopy

    release, dropped = threading.Event(), threading.Event()

    class LateDomain:
        def name(self) -> str:
            return "vmfx-copy-1"

        def destroy(self) -> None:
            dropped.set()

        def isPersistent(self) -> bool:  # noqa: N802
            return False

    class LateConn:
        def restoreFlags(self, path: str, xml: str, flags: int) -> int:  # noqa: N802
            release.wait(60)
            return 0

        def lookupByName(self, name: str) -> LateDomain:  # noqa: N802
            assert name == "vmfx-copy-1"
            return LateDomain()

    conn = LateConn()
    host = Host("qemu+ssh://hv/system", conn, "9.0.0", "7.2.0")
    copy = StateCopy("uuid", "vmfx-copy-1", "/pool/vmfx-copy-1.save")
    with pytest.raises(GuestError, match="did not answer within 0.2 s"):
        bounded("restoring", lambda: conn.restoreFlags(copy.path, "<domain/>", 0), 0.2,
                undo=functools.partial(drop_late_restore, host, copy))
    assert copy.busy, "a restore may still read it"
    release.set()
    assert dropped.wait(60)
    deadline = time.monotonic() + 10
    while copy.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not copy.busy
