"""Guest RAM as a file that restored guests map instead of load ("mapped" states).

A stream state holds the guest's RAM inside QEMU's migration stream, so every restore reads all of
it into the new process's private memory: time and host memory in proportion to the RAM. A mapped
state keeps the RAM as a file of its own (``ram``, sparse: pages the guest never touched or freed
are holes) and the stream only the device state, a megabyte:

- the cold boot backs the guest's RAM with a file QEMU shares (``share=on``), and the save leaves
  that memory out of the stream (the ``x-ignore-shared`` migration capability); the file then *is*
  the RAM image;
- a restore maps the same file copy-on-write (``share=off``) with the same capability, so loading
  reads only the device state, the guest faults in the pages it touches, its writes stay private,
  and guests of one state share the unchanged pages through the host's page cache.

The file must not change while a state uses it. QEMU before 8.2 opens it read-write even for a
private mapping (8.2 brought ``readonly=on,rom=off``), so there it stays owner-writable; every
restore first compares it with the size and modification time recorded at the save
(:func:`check`), the cache compares its digest before a process first uses it (``Cache.check_entry``), and a changed file is a
SnapshotError, on which the pool makes the state again.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ...errors import GuestError, SnapshotError
from ...images.image import BuiltImage
from ..base import Monitor, SavedState
from ..common import opt
from .balloon import reports_free_pages

RAM_NAME = "ram"  # in a mapped state's directory: the guest's RAM
RAM_FINGERPRINT = "ram.json"  # its size and modification time when it was saved
CAPABILITY = "x-ignore-shared"


def _version(text: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def maps_ram(qemu_version: str) -> bool:
    """Whether this QEMU can back RAM by a named backend and leave shared RAM out of a migration (5.0+)."""
    return _version(qemu_version) >= (5, 0)


def opens_read_only(qemu_version: str) -> bool:
    """Whether this QEMU can map a read-only file privately and writably (``readonly=on,rom=off``, 8.2+)."""
    return _version(qemu_version) >= (8, 2)


def chosen(setting: str, image: BuiltImage, qemu_version: str) -> str:
    """``mapped`` or ``stream`` for guests of ``image``.

    ``auto`` maps wherever QEMU can, except for guests with a free-page-reporting balloon (your
    own cloud images): QEMU (7.2 seen) discards the pages a guest reports free by punching them out
    of the backing file even when the mapping is private, which would change the state under every
    other guest. ``mapped`` asked for such a guest drops the balloon instead (see command.py).
    """
    if setting == "stream" or not maps_ram(qemu_version):
        return "stream"
    if setting == "auto" and reports_free_pages(image):
        return "stream"
    return "mapped"


@dataclass(frozen=True)
class RamFile:
    """How one QEMU process backs its RAM by a file."""

    path: Path
    shared: bool  # the cold boot writes its RAM into the file; a restore maps it privately
    read_only: bool = False  # QEMU 8.2+: open the file O_RDONLY and still let the guest write its private copy
    fd: int | None = None  # a restore's: the checked file, open; QEMU is given it (pass_fds), never the path

    def arguments(self, memory_mb: int) -> list[str]:
        """The ``-object`` for the backend (the machine names it with ``memory-backend=ram0``).

        A restore's file is named by its open descriptor (``/proc/self/fd/N`` in QEMU, which reopens that very
        file): the file QEMU maps is the one :func:`check` checked, whatever happens to the path meanwhile,
        and a file gone by then cannot be created anew by QEMU (before 8.2 it would create a missing one)."""
        where = f"/proc/self/fd/{self.fd}" if self.fd is not None else opt(self.path)
        spec = f"memory-backend-file,id=ram0,size={memory_mb}M,mem-path={where},share={'on' if self.shared else 'off'}"
        if self.read_only:
            spec += ",readonly=on,rom=off"
        return ["-object", spec]


def allocate(path: Path, memory_mb: int) -> None:
    """Make a cold boot's RAM file with all its blocks reserved. QEMU would only size it, and a guest
    writing a page the full filesystem has no block for kills QEMU with SIGBUS; reserved, a full disk
    is one clear error before the boot. The save punches the zero pages out again (:func:`freeze`).

    The free space is checked first: a fallocate that fails for want of space keeps what it got until the
    file goes, so for that moment the filesystem would be full for everyone (other guests' overlays too)."""
    vfs = os.statvfs(path.parent)
    free_mb = vfs.f_bavail * vfs.f_frsize >> 20
    if free_mb < memory_mb:
        raise GuestError(
            f"cannot reserve {memory_mb} MiB for the guest's RAM file {path}: No space left on device (only {free_mb} "
            f"MiB free there); free space (it is returned when the state is saved) or use --vm-ram-state=stream"
        )
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(fd, 0, memory_mb << 20)
    except OSError as exc:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise GuestError(
            f"cannot reserve {memory_mb} MiB for the guest's RAM file {path}: {exc.strerror}; free space there "
            f"(it is returned when the state is saved) or use --vm-ram-state=stream"
        ) from None
    os.close(fd)


def enable_capability(qmp: Monitor) -> None:
    """Leave the file-backed RAM out of the stream; both ends of a save and a restore must agree."""
    qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": CAPABILITY, "state": True}]})


def freeze(ram: Path, directory: Path) -> None:
    """Move a saved guest's RAM file into the state ``directory``, holes punched where pages are zero
    (pages the guest never touched or freed: its kernel zeroes freed pages), and record its fingerprint."""
    subprocess.run(["fallocate", "--dig-holes", str(ram)], check=True, capture_output=True, timeout=300)
    target = directory / RAM_NAME
    os.replace(ram, target)
    os.chmod(target, 0o600)  # the guest's memory (keys, whatever the provisioning left): its owner's only
    info = target.stat()
    (directory / RAM_FINGERPRINT).write_text(json.dumps({"size": info.st_size, "mtime_ns": info.st_mtime_ns}))


def ram_of(state: SavedState) -> Path | None:
    """The state's RAM file, or None for a stream state."""
    fingerprint = state.directory / RAM_FINGERPRINT
    return state.directory / RAM_NAME if fingerprint.exists() else None


def check(state: SavedState) -> tuple[Path, int]:
    """The state's RAM file, open (not through a symlink), after making sure the open file is the one the
    save wrote; a SnapshotError if not. The caller closes the descriptor.

    Cheap enough for every restore (one fstat); the digest is compared by the cache before a process first uses the state.
    """
    ram = state.directory / RAM_NAME
    try:
        expected = json.loads((state.directory / RAM_FINGERPRINT).read_text())
        fd = os.open(ram, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise SnapshotError(f"saved state {state.key}: its RAM file {exc.filename} is gone") from None
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"saved state {state.key}: cannot open its RAM file or read its record: {exc}") from None
    info = os.fstat(fd)
    if (not stat.S_ISREG(info.st_mode) or info.st_size != expected.get("size")
            or info.st_mtime_ns != expected.get("mtime_ns")):
        os.close(fd)
        raise SnapshotError(
            f"saved state {state.key}: its RAM file {ram} changed after it was saved "
            f"(size {info.st_size}, was {expected.get('size')}); no guest may run from it"
        )
    return ram, fd


def make_openable(fd: int, qemu_version: str) -> None:
    """QEMU before 8.2 opens the RAM file read-write although it maps it privately: give the owner
    back the write bit the cache took (an ordinary user cannot open a 0400 file read-write). ``fd``:
    the checked file, open (:func:`check`); a mode change leaves its recorded size and time alone."""
    if opens_read_only(qemu_version) or os.fstat(fd).st_mode & stat.S_IWUSR:
        return
    os.fchmod(fd, 0o600)
