"""Files on a libvirt host that does not share this machine's filesystem.

A remote host gets images and saved states through one libvirt storage pool
(a directory pool, ``vmfixtures`` unless ``--vm-libvirt-pool`` says otherwise)
that its administrator creates once. Everything goes through libvirt's own
connection (volume upload and download), so a host needs no other access.

Two kinds of volume live there:

* shared, named by content (``vmfx-img-<digest>.qcow2``, ``...vmlinuz``,
  ``vmfx-state-<key>.qcow2``): uploaded once per host and kept for every later
  run, from any machine. A finished upload is marked by an empty companion
  volume ``<name>.done``; a volume without it is being uploaded by someone
  else (wait while it grows) or was left half-written (it stops growing; it is
  deleted and uploaded again);
* a run's own (``vmfx-<session>-<client>-...``): guests' overlays and saved-RAM
  copies, deleted when the guest or the run ends, and reaped by a later run
  from the same machine if the run was killed.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from ..errors import GuestError
from ..options import DEFAULT_LIBVIRT_POOL
from ..runtime import pid_alive
from ..waiting import Deadline

try:
    import libvirt  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - depends on the optional extra
    libvirt = None

DONE = ".done"
CHUNK = 1 << 20
STALLED_S = 30.0  # an upload that has not grown for this long was abandoned
# A run's own volumes: vmfx-<pid>-<8 hex>-<client 8 hex>-...
RUN_OWNED = re.compile(r"^vmfx-(\d+)-[0-9a-f]{8}-([0-9a-f]{8})-")

Progress = Callable[[str], None]


def file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def pool_setup(name: str) -> str:
    """What a host's administrator runs once to give the plugin its pool there."""
    return (f"virsh pool-define-as {name} dir --target /var/lib/libvirt/{name} && virsh pool-build {name} && "
            f"virsh pool-start {name} && virsh pool-autostart {name}")


def volume_xml(name: str, capacity: int, fmt: str = "raw", backing: str | None = None) -> str:
    backing_xml = (
        f"<backingStore><path>{escape(backing)}</path><format type='qcow2'/></backingStore>" if backing else ""
    )
    return (
        f"<volume><name>{escape(name)}</name><capacity unit='bytes'>{capacity}</capacity>"
        f"<allocation unit='bytes'>0</allocation><target><format type='{fmt}'/>"
        f"<permissions><mode>0600</mode></permissions></target>{backing_xml}</volume>"
    )


class HostStorage:
    """One host's storage pool, seen through its libvirt connection."""

    def __init__(self, conn: Any, uri: str, pool_name: str = DEFAULT_LIBVIRT_POOL) -> None:
        self.uri = uri
        self.conn = conn
        try:
            self.pool = conn.storagePoolLookupByName(pool_name)
        except libvirt.libvirtError:
            raise GuestError(
                f"{uri} has no storage pool {pool_name!r}, which remote hosts need for images and saved states; "
                f"on that host: {pool_setup(pool_name)} (or name another pool with --vm-libvirt-pool)"
            ) from None
        if not self.pool.isActive():
            raise GuestError(f"{uri}: storage pool {pool_name!r} is not active: virsh pool-start {pool_name}")
        self.uploads = 0  # volumes this process uploaded (shared and own)
        self.stalled_s = STALLED_S
        self._ready: dict[str, str] = {}  # shared volumes known to be complete here: name -> path
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
        stream = self.conn.newStream(0)
        volume.download(stream, 0, 0, 0)
        try:
            with open(target, "wb") as f:
                while data := stream.recv(CHUNK):  # a blocking stream: b"" at the end, errors raise
                    f.write(data)
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
    def ensure(self, name: str, source: Callable[[], tuple[Iterable[bytes], int]], progress: Progress) -> str:
        """The path of shared volume ``name``, uploading it from ``source()`` if no finished copy is there.

        Content-named volumes do not change, so each is looked up once per run (every guest start needs them).
        """
        path = self._ready.get(name)
        if path is None:
            path = self._ready[name] = self._ensure(name, source, progress)
        return path

    def _ensure(self, name: str, source: Callable[[], tuple[Iterable[bytes], int]], progress: Progress) -> str:
        while True:
            volume = self._lookup(name)
            if volume is not None and self._lookup(name + DONE) is not None:
                return str(volume.path())
            if volume is None:
                chunks, size = source()
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
            self._wait_or_take_over(name, volume, progress)

    def _wait_or_take_over(self, name: str, volume: Any, progress: Progress) -> None:
        """Another upload of ``name`` is running or was abandoned: wait while it grows, else delete it."""
        progress(f"waiting for another run copying {name} to {self.uri}")
        last = -1
        stalled = Deadline(self.stalled_s)
        while self._lookup(name + DONE) is None:
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
    def reap(self, client: str) -> None:
        """Delete own volumes left by killed runs of this machine (``client`` tag)."""
        self.refresh()
        for name in self.names():
            match = RUN_OWNED.match(name)
            if match and match.group(2) == client and not pid_alive(int(match.group(1)), None):
                self.delete(name)
