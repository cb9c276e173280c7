"""An image's disk in the format another hypervisor reads, converted once with qemu-img and cached.

Each conversion is a cache entry ``converted/<image disk digest>-<format>``:
made in the cache's tmp/, its manifest (with the converted file's digest)
written last, renamed into place under the entry's lock. So a conversion cut
short (the run killed, the disk full) is never found, and a converted file
damaged later fails its digest on first use in a process and is converted
again.

The formats, and why:

* vmdk, ``monolithicSparse``: one sparse file that VMware Workstation, Player
  and Fusion run as it is, and that ESXi takes in with ``vmkfstools -i`` (ESXi
  runs no hosted-format disk directly, and no streamOptimized one either: that
  subformat is for OVF transfer, compressed and not writable in place, and
  Workstation does not run it either). The adapter type is lsilogic, matching
  the controller the VMware template gives the disk.
* vdi, dynamic: VirtualBox's own format, growing as written.
* vhdx, dynamic: Hyper-V's format (Generation 1 machines boot it from IDE).
* raw: for libvirt's test driver, which never reads it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from ...errors import ImageError
from ...images.cache import Cache
from ...images.image import BuiltImage
from ...images.tools import run_tool

KIND = "converted"
CONVERT_TIMEOUT = 1800.0
OPTIONS: dict[str, tuple[str, ...]] = {
    "vmdk": ("-o", "subformat=monolithicSparse,adapter_type=lsilogic"),
    "vdi": ("-o", "static=off"),
    "vhdx": ("-o", "subformat=dynamic"),
    "raw": (),
}
# qemu-img check reads every table of these formats; raw has none to check.
CHECKABLE = frozenset({"vmdk", "vdi", "vhdx"})


def conversion_key(image: BuiltImage, disk_format: str) -> str:
    return f"{image.disk_sha256[:32]}-{disk_format}"


def converted_disk(
    cache: Cache, image: BuiltImage, disk_format: str, qemu_img: str = "qemu-img",
    progress: Callable[[str], None] = lambda message: None,
) -> Path:
    """``image``'s disk in ``disk_format``: the image's own disk when it is in that format already
    (and for qcow2, which the QEMU driver's overlay takes over any backing format), else a
    conversion made once per (disk digest, format) and shared by every run using this cache."""
    if disk_format in ("qcow2", image.disk_format):
        return image.disk
    if disk_format not in OPTIONS:
        raise ImageError(f"no conversion to {disk_format!r}: the portable path converts to "
                         f"{', '.join(sorted(OPTIONS))}")
    name = f"disk.{disk_format}"

    def create(directory: Path) -> None:
        started = time.monotonic()
        progress(f"converting {image.name}'s disk to {disk_format} (once; cached afterwards)")
        target = directory / name
        run_tool([qemu_img, "convert", "-q", "-f", image.disk_format, "-O", disk_format, *OPTIONS[disk_format],
                  str(image.disk), str(target)],
                 hint=f"qemu-img could not convert {image.disk} ({image.disk_format}) to {disk_format}",
                 timeout=CONVERT_TIMEOUT)
        if disk_format in CHECKABLE:
            run_tool([qemu_img, "check", "-q", "-f", disk_format, str(target)],
                     hint=f"qemu-img wrote a {disk_format} file it cannot read back", timeout=CONVERT_TIMEOUT)
        cache.write_manifest(directory, {"kind": KIND, "source": image.name, "source_sha256": image.disk_sha256,
                                         "source_format": image.disk_format, "format": disk_format,
                                         "options": list(OPTIONS[disk_format])}, [name])
        progress(f"converted {image.name}'s disk to {disk_format} in {time.monotonic() - started:.1f} s")

    (cache.root / KIND).mkdir(parents=True, exist_ok=True)
    entry = cache.entry(KIND, conversion_key(image, disk_format), create, cache.check_entry,
                        waiting=lambda: progress(f"waiting for another run converting {image.name} to {disk_format}"))
    os.utime(entry)  # most recently used, for `images prune --older-than`
    return entry / name
