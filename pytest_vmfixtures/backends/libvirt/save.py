"""Saved states through libvirt: its save image format, and saving a domain (common.load_incoming loads one).

libvirt's save image is what ``virDomainSave`` writes and ``virDomainRestore`` reads.

A save image is a fixed header, the domain XML (plus libvirt's cookie), then
QEMU's migration stream. The backend reads it in two ways:

* on this machine, it hands QEMU the stream part as a file descriptor
  (:func:`stream_offset` says where it starts);
* on another host, where no descriptor can be passed, libvirt restores the
  file itself. libvirt insists that the domain restored from a save image has
  the image's UUID and runs one domain per UUID, so each guest restored there
  at the same time needs its own copy: :func:`rewrap` gives a copy a new domain
  XML (new UUID) in front of the same migration stream.

Header: magic, then 19 little-endian uint32 (version, length of XML + cookie,
was_running, compressed, offset of the cookie in that data, 14 unused).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

from ...errors import SnapshotError
from ..common import run_qemu_img
from .calls import bounded, libvirt
from .machine import LibvirtMachine
from .storage import HostStorage

SAVE_MAGIC = b"LibvirtQemudSave"
SAVE_HEADER = struct.Struct("<16s5I56x")
QEMU_STREAM_MAGIC = b"QEVM"
CHUNK = 1 << 20


def _read_header(f: object, path: Path) -> tuple[int, int, int, int, int]:
    header = f.read(SAVE_HEADER.size)  # type: ignore[attr-defined]
    if len(header) < SAVE_HEADER.size:
        raise SnapshotError(f"{path} is too short to be a libvirt save image")
    magic, version, data_len, running, compressed, cookie = SAVE_HEADER.unpack(header)
    if magic != SAVE_MAGIC:
        raise SnapshotError(f"{path} is not a libvirt save image (magic {magic!r})")
    if compressed:
        raise SnapshotError(
            f"{path} is compressed (save_image_format in qemu.conf); set it to raw and delete the saved state"
        )
    return version, data_len, running, compressed, cookie


def stream_offset(path: Path) -> int:
    """Where QEMU's migration stream starts in a save image; checks the image is one we can load."""
    with open(path, "rb") as f:
        version, data_len, _running, _compressed, _cookie = _read_header(f, path)
        offset: int = SAVE_HEADER.size + int(data_len)
        f.seek(offset)
        if f.read(4) != QEMU_STREAM_MAGIC:
            raise SnapshotError(f"{path}: no QEMU migration stream after libvirt's header (format version {version})")
    return offset


def rewrap(path: Path, xml: str) -> tuple[Iterator[bytes], int]:
    """A copy of save image ``path`` carrying domain ``xml`` instead of its own: its bytes, and how many.

    (A storage volume is created with its size up front, before the bytes go in.)
    """
    offset = stream_offset(path)
    with open(path, "rb") as f:
        version, data_len, running, _compressed, cookie_at = _read_header(f, path)
        data = f.read(data_len)
    cookie = data[cookie_at:].rstrip(b"\0") if cookie_at else b""
    new_xml = xml.encode() + b"\0"
    new_data = new_xml + (cookie + b"\0" if cookie else b"")
    head = SAVE_HEADER.pack(SAVE_MAGIC, version, len(new_data), running, 0, len(new_xml) if cookie else 0) + new_data

    def chunks() -> Iterator[bytes]:
        yield head
        with open(path, "rb") as f:
            f.seek(offset)
            while chunk := f.read(CHUNK):
                yield chunk

    return chunks(), len(head) + path.stat().st_size - offset


def save_domain(machine: LibvirtMachine, directory: Path, qemu_img: str) -> None:
    """``virDomainSave`` ``machine`` into ``directory`` (memory, disk.qcow2, a UEFI guest's nvram.qcow2);
    a remote host's save comes home."""
    memory = directory / "memory"
    storage = machine.host.storage
    target = str(memory) if storage is None else f"{storage.directory}/{machine.domain_name}.save"
    try:
        bounded(f"{machine.name}: saving state", lambda: machine.domain.save(target), 600.0)
    except libvirt.libvirtError as exc:
        raise SnapshotError(f"{machine.name}: libvirt could not save the guest: {exc.get_error_message()}") from exc
    if storage is not None:
        _fetch_saved(machine, storage, directory, qemu_img)
    stream_offset(memory)  # fail now, not at the first restore
    info = memory.stat()
    if info.st_uid != os.getuid():
        try:
            os.chown(memory, os.getuid(), os.getgid())
        except OSError as exc:
            raise SnapshotError(f"{memory} belongs to uid {info.st_uid}, not to us, and cannot be chowned") from exc
    os.chmod(memory, 0o600)
    if storage is None:
        os.replace(machine.overlay, directory / "disk.qcow2")
        if machine.nvram is not None:
            # A UEFI guest's variables are frozen with its disk; each restored guest overlays them.
            os.chmod(machine.nvram, 0o600)
            os.replace(machine.nvram, directory / machine.nvram.name)
    machine.stop()


def _fetch_saved(machine: LibvirtMachine, storage: HostStorage, directory: Path, qemu_img: str) -> None:
    """Bring a state saved on a remote host into the local cache, its disk layer over the local image."""
    saved = f"{machine.domain_name}.save"
    try:
        storage.refresh()  # the save file appeared behind libvirt's back
        storage.download(saved, directory / "memory")
        storage.download(Path(machine.overlay).name, directory / "disk.qcow2")
    finally:
        storage.delete(saved)
    run_qemu_img(qemu_img, "rebase", "-u", "-F", "qcow2", "-b", str(machine.backing), str(directory / "disk.qcow2"))
