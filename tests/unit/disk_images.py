"""BuiltImage values for unit tests: a built-in debian-12 whose files need not exist, and a small real disk
with the BuiltImage around it, for tests of what is done with an image's disk."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from pytest_vmfixtures.images.cache import sha256_file
from pytest_vmfixtures.images.image import BuiltImage, GuestOS


def built_in_image() -> BuiltImage:
    """A built-in x86 debian-12 image, as the cache would hand it out (its files are not there)."""
    directory = Path("/cache/images/debian-12-0123")
    return BuiltImage(
        directory=directory, name="debian-12", recipe_digest="r", disk=directory / "disk.qcow2", disk_sha256="0" * 64,
        kernel=directory / "vmlinuz", initrd=directory / "initrd.img", cmdline="root=/dev/vda rw console=ttyS0",
        user="root", client_key=directory / "client_key", host_key="ssh-ed25519 AAAA", arch="x86_64",
        os=GuestOS("debian", "12", "systemd", "apt"), agent=True, built_at=0.0, builder_version="1",
    )


def small_image(directory: Path, disk_format: str = "qcow2") -> BuiltImage:
    """A 32 MiB disk with 4 MiB of random bytes in its middle: real data for qemu-img to carry over."""
    directory.mkdir(parents=True, exist_ok=True)
    raw = directory / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(32 << 20)
        f.seek(12 << 20)
        f.write(os.urandom(4 << 20))
    disk = raw
    if disk_format == "qcow2":
        disk = directory / "disk.qcow2"
        subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", str(raw), str(disk)], check=True, timeout=60)
    return BuiltImage(
        directory=directory, name="small", recipe_digest="r", disk=disk, disk_sha256=sha256_file(disk), kernel=None,
        initrd=None, cmdline="", user="root", client_key=directory / "key", host_key="", arch="x86_64",
        os=GuestOS("unknown", "", "unknown", "unknown"), agent=False, built_at=0.0, builder_version="t",
        firmware="bios", disk_format=disk_format,
    )
