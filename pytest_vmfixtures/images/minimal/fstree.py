"""A filesystem assembled in memory, written as a tar or a cpio archive.

Archives made here can say that a file belongs to root, or is a device node,
whoever runs the build: genext2fs turns the tar into the root filesystem and
the kernel unpacks the cpio as its initramfs, so the extract builder needs no
root, no user namespace and no real files with those owners.
"""

from __future__ import annotations

import io
import posixpath
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

# Directories merged into /usr, as in current Debian: packages may still ship
# files under /bin or /lib, and the root links those names into /usr.
MERGED_DIRS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
_TRAILER = "TRAILER!!!"


def usr_path(path: str) -> str:
    """Where a packaged path lives in a merged-/usr root: ``lib/x`` is ``usr/lib/x``."""
    path = posixpath.normpath(path.lstrip("/"))
    return f"usr/{path}" if path.split("/", 1)[0] in MERGED_DIRS else path


@dataclass
class Member:
    """One entry; ``kind`` is "dir", "file", "link" or "char"."""

    kind: str
    mode: int
    data: bytes = b""
    target: str = ""
    uid: int = 0
    gid: int = 0
    device: tuple[int, int] = (0, 0)


class Tree:
    """Paths are relative (``etc/passwd``); parents appear as directories when needed."""

    def __init__(self, mtime: int) -> None:
        self.mtime = mtime
        self.members: dict[str, Member] = {}

    def __contains__(self, path: str) -> bool:
        return path in self.members

    def _parents(self, path: str) -> None:
        parent = posixpath.dirname(path)
        if parent and parent not in self.members:
            self.directory(parent)

    def directory(self, path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        self._parents(path)
        existing = self.members.get(path)
        if existing is None or existing.kind != "dir":
            self.members[path] = Member("dir", mode, uid=uid, gid=gid)
        else:
            existing.mode, existing.uid, existing.gid = mode, uid, gid

    def file(self, path: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
        self._parents(path)
        self.members[path] = Member("file", mode, data=data, uid=uid, gid=gid)

    def link(self, path: str, target: str) -> None:
        self._parents(path)
        self.members[path] = Member("link", 0o777, target=target)

    def char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._parents(path)
        self.members[path] = Member("char", mode, device=(major, minor))

    def resolve(self, path: str) -> str | None:
        """The regular file ``path`` leads to through the tree's symlinks, if it does."""
        for _ in range(40):  # the kernel's own limit on nested links
            member = self.members.get(path)
            if member is None or member.kind not in ("file", "link"):
                return None
            if member.kind == "file":
                return path
            if member.target.startswith("/"):
                path = usr_path(member.target)
            else:
                path = posixpath.normpath(posixpath.join(posixpath.dirname(path), member.target))
        return None

    def write_tar(self, target: Path) -> None:
        kinds = {"dir": tarfile.DIRTYPE, "file": tarfile.REGTYPE, "link": tarfile.SYMTYPE, "char": tarfile.CHRTYPE}
        with tarfile.open(target, "w", format=tarfile.GNU_FORMAT) as tar:
            for path, member in sorted(self.members.items()):
                info = tarfile.TarInfo(path)
                info.type, info.mode, info.mtime = kinds[member.kind], member.mode, self.mtime
                info.uid, info.gid = member.uid, member.gid
                info.uname, info.gname = ("root", "root") if member.uid == 0 else ("", "")
                info.linkname = member.target
                info.devmajor, info.devminor = member.device
                if member.kind == "file":
                    info.size = len(member.data)
                    tar.addfile(info, io.BytesIO(member.data))
                else:
                    tar.addfile(info)

    def cpio(self) -> bytes:
        """The tree as a "newc" cpio archive, the format the kernel unpacks into its initramfs."""
        kinds = {"dir": stat.S_IFDIR, "file": stat.S_IFREG, "link": stat.S_IFLNK, "char": stat.S_IFCHR}
        out = bytearray()
        for inode, (path, member) in enumerate(sorted(self.members.items()), start=1):
            body = member.target.encode() if member.kind == "link" else member.data
            links = 2 if member.kind == "dir" else 1
            major, minor = member.device
            fields = (inode, kinds[member.kind] | member.mode, member.uid, member.gid, links, self.mtime, len(body))
            _cpio_entry(out, (*fields, 0, 0, major, minor, len(path) + 1, 0), path, body)
        _cpio_entry(out, (0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, len(_TRAILER) + 1, 0), _TRAILER, b"")
        return bytes(out)


def _cpio_entry(out: bytearray, fields: tuple[int, ...], name: str, body: bytes) -> None:
    """Header, name and body, each padded to 4 bytes as "newc" requires."""
    out += b"070701" + b"".join(b"%08X" % value for value in fields) + name.encode() + b"\0"
    out += b"\0" * (-len(out) % 4)
    out += body
    out += b"\0" * (-len(out) % 4)
