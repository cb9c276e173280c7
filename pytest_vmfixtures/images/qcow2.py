"""What the plugin reads from a qcow2 file's header (no qemu-img run needed)."""

from __future__ import annotations

import struct
from pathlib import Path

MAGIC = b"QFI\xfb"
# magic, version, backing file offset, backing file name length, cluster bits, virtual size
HEADER = struct.Struct(">4sIQIIQ")


def _header(path: Path) -> tuple[bytes, int, int, int, int, int] | None:
    with path.open("rb") as handle:
        data = handle.read(HEADER.size)
    if len(data) < HEADER.size or data[:4] != MAGIC:
        return None
    return HEADER.unpack(data)


def backing_file(path: Path) -> Path | None:
    """The backing file a qcow2 image names in its header, or None (none, not qcow2, unreadable)."""
    try:
        header = _header(path)
        if header is None:
            return None
        _magic, _version, offset, size, _bits, _virtual = header
        if offset == 0 or size == 0 or size > 4096:
            return None
        with path.open("rb") as handle:
            handle.seek(offset)
            name = handle.read(size).decode("utf-8", "replace")
    except OSError:
        return None
    backing = Path(name)
    return backing if backing.is_absolute() else path.parent / backing


def virtual_size(path: Path) -> int | None:
    """The disk size a qcow2 file presents, or None if ``path`` is not a qcow2 file."""
    header = _header(path)
    return None if header is None else header[5]
