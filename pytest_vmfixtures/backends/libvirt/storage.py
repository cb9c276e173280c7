"""Files on a libvirt host that does not share this machine's filesystem.

A remote host gets images and saved states through one libvirt storage pool
(a directory pool, ``vmfixtures`` unless ``--vm-libvirt-pool`` says otherwise)
that its administrator creates once. Everything goes through libvirt's own
connection (volume upload and download), so a host needs no other access.

Two kinds of volume live there:

* shared, named by content (``vmfx-img-<digest>.qcow2``, ``...vmlinuz``,
  ``vmfx-state-<key>-<digest>.qcow2``): uploaded once per host and kept for
  every later run, from any machine. A finished upload is marked by an empty
  companion volume ``<name>.done``; a volume without it is being uploaded by
  someone else (wait while it grows) or was left half-written (it stops
  growing; it is deleted and uploaded again). A finished one is not trusted
  by its name and marker: the first time a run uses it, its bytes are read
  back and their sha256 compared with the local file's; a copy that differs
  is deleted and uploaded again;
* a run's own (``vmfx-<session>-<client>-...``): guests' overlays and saved-RAM
  copies, deleted when the guest or the run ends, and reaped by a later run
  from the same machine if the run was killed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from ...errors import GuestError, ImageError
from ...images import qcow2
from ...images.image import BuiltImage
from ...waiting import Deadline
from ..base import SavedState
from ..common import NVRAM_NAME, find_ovmf, guest_disks, run_qemu_img
from .calls import bounded, libvirt
from .names import owner
from .uris import DEFAULT_LIBVIRT_POOL
from .xmltext import text

log = logging.getLogger("pytest_vmfixtures")

DONE = ".done"
CHUNK = 1 << 20
STALLED_S = 30.0  # an upload that has not grown for this long was abandoned
ENSURE_S = 3 * 3600.0  # a shared volume not there and finished by then (ours or another run's copy) is an error
MISMATCHES = 3  # a shared copy found wrong this many times in one run (someone keeps replacing it): give up

Progress = Callable[[str], None]


@dataclass
class StateCopy:
    """A remote host's copy of a saved RAM state, under its own UUID; one guest restores from it at a time."""

    uuid: str
    name: str  # of the domain restored from it, and (+ ".save") of its volume
    path: str
    busy: bool = True


def file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


@dataclass
class LocalFile:
    """What a shared volume must hold: the bytes of a local file (whose sha256 may be known already)."""

    path: Path
    known_sha256: str | None = None

    @functools.cached_property
    def sha256(self) -> str:
        if self.known_sha256 is not None:
            return self.known_sha256
        with open(self.path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    def content(self) -> tuple[Iterator[bytes], int]:
        """Its bytes, and how many (a volume is created with its size up front)."""
        return file_chunks(self.path), self.path.stat().st_size


def pool_setup(name: str) -> str:
    """What a host's administrator runs once to give the plugin its pool there."""
    return (f"virsh pool-define-as {name} dir --target /var/lib/libvirt/{name} && virsh pool-build {name} && "
            f"virsh pool-start {name} && virsh pool-autostart {name}")


def volume_xml(name: str, capacity: int, fmt: str = "raw", backing: str | None = None) -> str:
    backing_xml = (
        f"<backingStore><path>{text(backing)}</path><format type='qcow2'/></backingStore>" if backing else ""
    )
    return (
        f"<volume><name>{text(name)}</name><capacity unit='bytes'>{capacity}</capacity>"
        f"<allocation unit='bytes'>0</allocation><target><format type='{fmt}'/>"
        f"<permissions><mode>0600</mode></permissions></target>{backing_xml}</volume>"
    )


class HostStorage:
    """One host's storage pool, seen through its libvirt connection."""

    def __init__(self, conn: Any, uri: str, pool_name: str = DEFAULT_LIBVIRT_POOL) -> None:
        self.uri = uri
        self.conn = conn
        self.pool_name = pool_name
        try:
            self.pool = conn.storagePoolLookupByName(pool_name)
        except libvirt.libvirtError:
            raise GuestError(
                f"{uri} has no storage pool {pool_name!r}, which remote hosts need for images and saved states; "
                f"on that host: {pool_setup(pool_name)} (or name another pool with --vm-libvirt-pool)"
            ) from None
        if not bounded(f"{uri}: is storage pool {pool_name!r} active", self.pool.isActive, 30.0):
            raise GuestError(f"{uri}: storage pool {pool_name!r} is not active: virsh pool-start {pool_name}")
        self.uploads = 0  # volumes this process uploaded (shared and own)
        self.stalled_s = STALLED_S
        self.ensure_s = ENSURE_S
        self._ready: dict[str, str] = {}  # shared volumes known to be complete and right here: name -> path
        self._locks: dict[str, threading.Lock] = {}  # one per shared volume: checked or uploaded once per run
        self._locks_lock = threading.Lock()
        self.state_disks: dict[tuple[object, ...], str] = {}  # a local state disk -> its volume here (state_disk)
        target = ElementTree.fromstring(self.pool.XMLDesc(0)).findtext("target/path")
        if not target:
            raise GuestError(f"{uri}: storage pool {pool_name!r} is not a directory pool (dir, fs or netfs)")
        self.directory = target

    # -- lookups ------------------------------------------------------------
    def _lookup(self, name: str) -> Any | None:
        try:
            return self.pool.storageVolLookupByName(name)
        except libvirt.libvirtError:
            return None

    def refresh(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):  # another refresh is running: its result will do
            self.pool.refresh(0)

    def names(self) -> list[str]:
        return [str(n) for n in self.pool.listVolumes()]

    # -- writing --------------------------------------------------------------
    def upload(self, name: str, chunks: Iterable[bytes], size: int, fmt: str = "raw") -> str:
        """Create volume ``name`` holding ``chunks`` (``size`` bytes in all); its path on the host."""
        volume = self.pool.createXML(volume_xml(name, size, fmt), 0)
        try:
            stream = self.conn.newStream(0)
            volume.upload(stream, 0, size, 0)
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        sent = stream.send(bytes(view))
                        if sent < 0:
                            raise GuestError(f"{self.uri}: upload of {name} failed")
                        view = view[sent:]
                stream.finish()
            except BaseException:
                with contextlib.suppress(libvirt.libvirtError):
                    stream.abort()
                raise
        except BaseException:
            with contextlib.suppress(libvirt.libvirtError):
                volume.delete(0)
            raise
        self.uploads += 1
        return str(volume.path())

    def overlay(self, name: str, backing: str, capacity: int) -> str:
        """A new qcow2 volume over ``backing`` (a path in this pool)."""
        return str(self.pool.createXML(volume_xml(name, capacity, "qcow2", backing), 0).path())

    def download(self, name: str, target: Path) -> None:
        volume = self._lookup(name)
        if volume is None:
            raise GuestError(f"{self.uri}: volume {name} is not in the storage pool")
        with open(target, "wb") as f:
            self._read(volume, f.write)

    def sha256(self, volume: Any) -> str:
        """The sha256 of ``volume``'s bytes as the host holds them, read back through libvirt."""
        digest = hashlib.sha256()
        self._read(volume, digest.update)
        return digest.hexdigest()

    def _read(self, volume: Any, sink: Callable[[bytes], object]) -> None:
        """Stream all of ``volume`` (``virStorageVolDownload``) into ``sink``."""
        stream = self.conn.newStream(0)
        volume.download(stream, 0, 0, 0)
        try:
            while data := stream.recv(CHUNK):  # a blocking stream: b"" at the end, errors raise
                sink(data)
            stream.finish()
        except BaseException:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            raise

    def delete(self, name: str) -> None:
        volume = self._lookup(name)
        if volume is not None:
            with contextlib.suppress(libvirt.libvirtError):  # gone meanwhile
                volume.delete(0)

    # -- shared, content-named volumes -----------------------------------------
    def ensure(self, name: str, source: LocalFile, progress: Progress) -> str:
        """The path of shared volume ``name`` holding ``source``'s bytes: a copy found there, once its
        bytes are checked against ``source``'s sha256, else one uploaded now.

        Content-named volumes do not change, so each is looked up and checked once per run (every
        guest start needs them).
        """
        path = self._ready.get(name)
        if path is None:
            with self._locks_lock:
                lock = self._locks.setdefault(name, threading.Lock())
            with lock:
                path = self._ready.get(name)
                if path is None:
                    path = self._ready[name] = self._ensure(name, source, progress)
        return path

    def _ensure(self, name: str, source: LocalFile, progress: Progress) -> str:
        mismatches = 0
        deadline = Deadline(self.ensure_s)
        while True:
            if deadline.expired():
                raise GuestError(
                    f"{self.uri}: {name} was not ready after {self.ensure_s:g} s: another client's copy there "
                    f"stopped growing and libvirt would not delete it (still open?); delete it on that host: "
                    f"virsh -c {self.uri} vol-delete --pool {self.pool_name} {name}")
            volume = self._lookup(name)
            if volume is not None and self._lookup(name + DONE) is not None:
                verdict = self._check(name, volume, source, progress)
                if verdict is None:
                    return str(volume.path())
                mismatches += verdict
                if mismatches >= MISMATCHES:
                    raise GuestError(f"{self.uri}: {name} held wrong bytes {mismatches} times in this run, "
                                     "replaced each time: something else keeps writing the storage pool")
                continue  # deleted (or replaced by another run meanwhile): look again
            if volume is None:
                chunks, size = source.content()
                progress(f"copying {name} ({size / 2**20:.0f} MiB) to {self.uri}")
                try:
                    path = self.upload(name, chunks, size)
                except libvirt.libvirtError as exc:
                    if self._lookup(name) is not None:
                        continue  # someone else started the same upload first: wait for theirs
                    raise GuestError(f"{self.uri}: cannot upload {name}: {exc.get_error_message()}") from exc
                try:
                    self.pool.createXML(volume_xml(name + DONE, 0), 0)
                except libvirt.libvirtError:
                    if self._lookup(name + DONE) is None:
                        raise
                return path
            self._wait_or_take_over(name, volume, progress, deadline)

    def _check(self, name: str, volume: Any, source: LocalFile, progress: Progress) -> int | None:
        """None if finished copy ``volume`` holds ``source``'s bytes; else it is deleted, and 1 (it was
        wrong) or 0 (it went away while being read: another run replaces it)."""
        try:
            size = int(volume.info()[2])  # bytes stored (its capacity is a qcow2's virtual size)
            progress(f"checking {name} on {self.uri} ({size / 2**20:.0f} MiB) against its sha256")
            found = self.sha256(volume)
        except libvirt.libvirtError as exc:
            if self._lookup(name) is None or self._lookup(name + DONE) is None:
                return 0
            raise GuestError(f"{self.uri}: cannot read {name} back to check it: {exc.get_error_message()}") from exc
        if found == source.sha256:
            return None
        message = (f"{name} on {self.uri} does not hold what its name says (sha256 {found[:16]}..., "
                   f"expected {source.sha256[:16]}...): deleting it and copying it again")
        log.warning("%s", message)
        progress(message)
        self.delete(name + DONE)  # first, so nobody takes the volume for finished meanwhile
        self.delete(name)
        if self._lookup(name) is not None:
            raise GuestError(f"{self.uri}: cannot delete {name}, a copy that does not match its sha256")
        return 1

    def _wait_or_take_over(self, name: str, volume: Any, progress: Progress, deadline: Deadline) -> None:
        """Another upload of ``name`` is running or was abandoned: wait while it grows (until ``deadline``),
        else delete it."""
        progress(f"waiting for another run copying {name} to {self.uri}")
        last = -1
        stalled = Deadline(self.stalled_s)
        while self._lookup(name + DONE) is None and not deadline.expired():
            try:
                grown = int(volume.info()[2])  # libvirt looks at the file again on each call
            except libvirt.libvirtError:
                return  # it went away: start over
            if grown != last:
                last, stalled = grown, Deadline(self.stalled_s)
            elif stalled.expired():
                progress(f"{name} on {self.uri} stopped growing (an interrupted copy); copying it again")
                with contextlib.suppress(libvirt.libvirtError):
                    volume.delete(0)
                return
            time.sleep(1.0)

    # -- cleanup -------------------------------------------------------------
    def reap(self, client: str, alive: Callable[[str], bool]) -> None:
        """Delete own volumes left by killed runs of this machine (``client`` tag) whose session is not ``alive``."""
        self.refresh()
        for name in self.names():
            session = owner(name, client)  # a run's own volumes are named as its domains are (names.py)
            if session is not None and not alive(session):
                self.delete(name)


# -- what a guest on a remote host needs there ------------------------------------


def qcow2_virtual_size(path: Path) -> int:
    size = qcow2.virtual_size(path)
    if size is None:
        raise ImageError(f"{path} is not a qcow2 image")
    return size


def guest_files(storage: HostStorage, image: BuiltImage, backing: Path, overlay_name: str, files: Path,
                state: SavedState | None, qemu_img: str, progress: Progress) -> dict[str, object]:
    """The paths on the host of a new guest's kernel, initrd and overlay (over the image or ``state``'s disk)."""
    assert image.kernel is not None and image.initrd is not None
    tag = f"vmfx-img-{image.disk_sha256[:16]}"
    paths: dict[str, object] = {
        "kernel": storage.ensure(f"{tag}.vmlinuz", LocalFile(image.kernel), progress),
        "initrd": storage.ensure(f"{tag}.initrd", LocalFile(image.initrd), progress),
    }
    remote_backing = storage.ensure(f"{tag}.qcow2", LocalFile(image.disk, image.disk_sha256), progress)
    if state is not None:
        remote_backing = state_disk(storage, state, remote_backing, files, qemu_img, progress)
    paths["overlay"] = storage.overlay(overlay_name, remote_backing, qcow2_virtual_size(backing))
    return paths


def state_disk(storage: HostStorage, state: SavedState, base: str, files: Path, qemu_img: str,
               progress: Progress) -> str:
    """The saved state's disk layer on a remote host, pointing at that host's copy of the image (``base``).

    Named by the sha256 of those bytes, not by the state's key alone: each machine that makes a
    state of one key boots its own guest, so two machines' disk layers of one key differ, and each
    belongs with its own saved RAM.
    """
    local = state.disk.stat()  # a state made again in this run (same key, new files) is a new layer
    known = (state.key, local.st_ino, local.st_mtime_ns, local.st_size)
    path = storage.state_disks.get(known)
    if path is not None:
        return path
    rebased = files / "state-disk.qcow2"
    try:
        shutil.copyfile(state.disk, rebased)
        run_qemu_img(qemu_img, "rebase", "-u", "-F", "qcow2", "-b", base, str(rebased))
        source = LocalFile(rebased)
        path = storage.ensure(f"vmfx-state-{state.key}-{source.sha256[:16]}.qcow2", source, progress)
    finally:
        with contextlib.suppress(OSError):
            rebased.unlink()
    storage.state_disks[known] = path
    return path


def host_files(storage: HostStorage | None, image: BuiltImage, backing: Path, overlay_name: str, files: Path,
               state: SavedState | None, qemu_img: str, progress: Progress) -> dict[str, object]:
    """Where the host finds this guest's kernel, initrd and (new) overlay; remote hosts (``storage``) get copies first.

    A guest of your own cloud image (local hosts only, see placement.hosts_for) has its seed, and with
    UEFI OVMF's code and an NVRAM of its own: a qcow2 overlay over OVMF's variable-store
    template at a cold boot, over the variables frozen with the state at a restore.
    """
    if storage is not None:
        return guest_files(storage, image, backing, overlay_name, files, state, qemu_img, progress)
    nvram = guest_disks(qemu_img, image, backing, files / overlay_name, files / NVRAM_NAME, state)
    paths: dict[str, object] = {"kernel": image.kernel, "initrd": image.initrd, "overlay": files / overlay_name,
                                "console": files / "console.log", "seed": image.seed}
    if nvram is not None:
        paths.update(ovmf_code=find_ovmf()[0], nvram=nvram)
    return paths


def drop_files(storage: HostStorage | None, overlay_name: str, files: Path) -> None:
    """Remove what a guest that did not start was given: its overlay, and its NVRAM if it had one."""
    if storage is not None:
        with contextlib.suppress(Exception):
            storage.delete(overlay_name)
    else:
        for name in (overlay_name, NVRAM_NAME):
            with contextlib.suppress(OSError):
                (files / name).unlink()
