"""Just enough ELF reading to assemble a minimal guest from unpacked packages.

The extract builder copies a few programs out of Debian packages without
installing them, so nothing resolves their shared libraries or kernel module
dependencies for it: it reads them here, from the files themselves, rather
than running ``ldd`` or ``modinfo`` (which would execute or need tools built
for the guest's architecture, not the host's).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

ELF_MAGIC = b"\x7fELF"
_SHT_DYNAMIC = 6
_DT_NEEDED = 1


@dataclass(frozen=True)
class ElfFile:
    """What the builder needs of one ELF file: its loader and its libraries."""

    interpreter: str | None
    needed: tuple[str, ...]


@dataclass(frozen=True)
class _Section:
    name: str
    kind: int
    offset: int
    size: int
    link: int


def is_elf(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC


def read_elf(data: bytes) -> ElfFile:
    """The program interpreter and ``DT_NEEDED`` entries; ValueError if malformed."""
    sections = _sections(data)
    interp = next((s for s in sections if s.name == ".interp"), None)
    interpreter = _cstring(data, interp.offset) if interp is not None else None
    needed: list[str] = []
    wide = data[4] == 2
    entry = struct.Struct(_endian(data) + ("qQ" if wide else "iI"))
    for dynamic in (s for s in sections if s.kind == _SHT_DYNAMIC):
        strings = sections[dynamic.link].offset
        for position in range(dynamic.offset, dynamic.offset + dynamic.size - entry.size + 1, entry.size):
            tag, value = entry.unpack_from(data, position)
            if tag == 0:
                break
            if tag == _DT_NEEDED:
                needed.append(_cstring(data, strings + value))
    return ElfFile(interpreter=interpreter, needed=tuple(needed))


def modinfo(data: bytes) -> dict[str, str]:
    """A kernel module's ``.modinfo`` strings (``depends``, ``name``, ...)."""
    section = next((s for s in _sections(data) if s.name == ".modinfo"), None)
    if section is None:
        raise ValueError("no .modinfo section: not a kernel module")
    info: dict[str, str] = {}
    for item in data[section.offset : section.offset + section.size].split(b"\0"):
        key, sep, value = item.decode("utf-8", "replace").partition("=")
        if sep:
            info.setdefault(key, value)
    return info


def _endian(data: bytes) -> str:
    if data[5] not in (1, 2):
        raise ValueError("unknown ELF byte order")
    return "<" if data[5] == 1 else ">"


def _sections(data: bytes) -> list[_Section]:
    if not is_elf(data) or len(data) < 52 or data[4] not in (1, 2):
        raise ValueError("not an ELF file")
    endian = _endian(data)
    try:
        if data[4] == 2:
            (table,) = struct.unpack_from(endian + "Q", data, 0x28)
            entry_size, count, names_index = struct.unpack_from(endian + "HHH", data, 0x3A)
            layout = struct.Struct(endian + "IIQQQQIIQQ")
        else:
            (table,) = struct.unpack_from(endian + "I", data, 0x20)
            entry_size, count, names_index = struct.unpack_from(endian + "HHH", data, 0x2E)
            layout = struct.Struct(endian + "IIIIIIIIII")
        raw = [layout.unpack_from(data, table + index * entry_size) for index in range(count)]
        names = raw[names_index][4]
        return [
            _Section(_cstring(data, names + fields[0]), fields[1], fields[4], fields[5], fields[6]) for fields in raw
        ]
    except (struct.error, IndexError) as exc:
        raise ValueError(f"truncated ELF file ({exc})") from exc


def _cstring(data: bytes, offset: int) -> str:
    end = data.find(b"\0", offset)
    if end < 0:
        raise ValueError("unterminated string in ELF file")
    return data[offset:end].decode("utf-8", "replace")
