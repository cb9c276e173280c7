"""Stand-ins for vendors' cloud images: Debian 12 with cloud-init, in two variants.

* ``uefi``: a GPT disk with an EFI system partition, booted by systemd-boot
  under UEFI firmware, with no guest agent (like Ubuntu's and Fedora's stock
  images): commands reach it over SSH only.
* ``bios``: an MBR disk booted by GRUB under the BIOS, with qemu-guest-agent
  installed (like Debian's genericcloud images).

Built without root, loop devices or mounts: mmdebstrap writes the root
filesystem as an ext2 image (genext2fs keeps the files' owners), e2fsprogs
turns it into ext4, and ``sfdisk`` lays a partition table on a plain file into
which the partitions are copied. For UEFI an EFI system partition is made with
``mkfs.vfat -C`` and filled with mtools (systemd-boot as the removable-media
loader, one loader entry, the kernel and initrd). For BIOS, GRUB's own
``grub-mkimage`` (run in the image, from Debian's grub-pc-bin) makes the core
image, which goes into the gap after the MBR, and GRUB's boot sector goes into
the MBR's code area, where ``grub-install`` would put them; the root
filesystem holds grub.cfg. No key is baked in: like a vendor image, each gets
its keys, user and host name from cloud-init's NoCloud seed.

This lives in the test tree: it is how the tests get a UEFI cloud image
without the internet, not something the plugin offers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pytest_vmfixtures.images.cache import Cache

VERSION = "1"
RELEASE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = (
    "linux-image-cloud-amd64",
    "systemd-sysv",
    "udev",
    "openssh-server",
    "cloud-init",
    "sudo",
    "systemd-boot-efi",  # only its EFI binary is used, copied onto the ESP
    "iproute2",
    "procps",
)
ROOT_LABEL = "cloudimg-rootfs"
ROOT_SIZE = 2 << 30
ESP_SIZE = 96 << 20
SECTOR = 512
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
BIOS_PACKAGES = ("grub-pc-bin", "qemu-guest-agent")
MBR_CODE = 440  # bytes of the MBR that hold boot code; the disk signature and partition table follow
TOOLS = {
    "mmdebstrap": "mmdebstrap",
    "genext2fs": "genext2fs",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "mmd": "mtools",
    "sfdisk": "fdisk",
    "tune2fs": "e2fsprogs",
    "qemu-img": "qemu-utils",
}

# Runs chrooted in the finished tree. What a vendor does to a cloud image:
# no host keys, no host name, a locked root, the root found by label.
_COMMON_SCRIPT = f"""\
set -eu
rm -f /etc/ssh/ssh_host_*
rm -f /etc/hostname
echo 'LABEL={ROOT_LABEL} / ext4 rw,relatime 0 1' > /etc/fstab
sed -i 's/^root:[^:]*:/root:*:/' /etc/shadow
: > /etc/resolv.conf
mkdir -p /etc/systemd/network /etc/systemd/journald.conf.d /etc/cloud/cloud.cfg.d
printf '[Match]\\nName=en* eth*\\n\\n[Network]\\nDHCP=ipv4\\nLinkLocalAddressing=no\\n' > /etc/systemd/network/99-dhcp.network
printf '[Journal]\\nStorage=volatile\\n' > /etc/systemd/journald.conf.d/10-volatile.conf
# Like Debian's "nocloud" images: look for a NoCloud seed only, never wait for a metadata server.
echo 'datasource_list: [NoCloud, None]' > /etc/cloud/cloud.cfg.d/90-datasource.cfg
systemctl enable systemd-networkd.service
systemctl mask apt-daily.timer apt-daily-upgrade.timer man-db.timer e2scrub_all.timer fstrim.timer
systemctl mask systemd-networkd-wait-online.service getty@tty1.service
kernel=$(ls /boot/vmlinuz-* | sort -V | tail -n 1)
version=${{kernel#/boot/vmlinuz-}}
mkdir -p /vmfix-out
cp "$kernel" /vmfix-out/vmlinuz
cp "/boot/initrd.img-$version" /vmfix-out/initrd.img
"""
_UEFI_SCRIPT = _COMMON_SCRIPT + "cp /usr/lib/systemd/boot/efi/systemd-bootx64.efi /vmfix-out/BOOTX64.EFI\n"
# GRUB's core image reads grub.cfg from the root filesystem (the first MBR partition).
_BIOS_SCRIPT = _COMMON_SCRIPT + f"""\
mkdir -p /boot/grub
cat > /boot/grub/grub.cfg <<END
set timeout=0
linux /boot/vmlinuz-$version root=LABEL={ROOT_LABEL} rw console=ttyS0 quiet panic=-1
initrd /boot/initrd.img-$version
boot
END
grub-mkimage -O i386-pc -o /vmfix-out/core.img -p '(hd0,msdos1)/boot/grub' biosdisk part_msdos ext2 normal linux
cp /usr/lib/grub/i386-pc/boot.img /vmfix-out/boot.img
rm /vmfix-out/vmlinuz /vmfix-out/initrd.img
"""

_LOADER_CONF = "default debian.conf\ntimeout 0\n"
_ENTRY = f"""\
title Debian 12 (cloud image stand-in)
linux /vmlinuz
initrd /initrd.img
options root=LABEL={ROOT_LABEL} rw console=ttyS0 quiet panic=-1
"""


@dataclass(frozen=True)
class Variant:
    name: str
    firmware: str
    agent: bool  # qemu-guest-agent installed
    packages: tuple[str, ...]
    script: str
    outputs: tuple[str, ...]  # the files the script leaves in /vmfix-out

    @property
    def disk_name(self) -> str:
        return f"debian-12-{self.name}-cloud.qcow2"


VARIANTS = {
    "uefi": Variant("uefi", "uefi", False, PACKAGES, _UEFI_SCRIPT, ("vmlinuz", "initrd.img", "BOOTX64.EFI")),
    "bios": Variant("bios", "bios", True, PACKAGES + BIOS_PACKAGES, _BIOS_SCRIPT, ("core.img", "boot.img")),
}
DISK_NAME = VARIANTS["uefi"].disk_name


def recipe_digest(variant: Variant = VARIANTS["uefi"]) -> str:
    document: dict[str, object] = {
        "version": VERSION,
        "release": RELEASE,
        "packages": variant.packages,
        "script": variant.script,
        "sizes": [ROOT_SIZE, ESP_SIZE],
    }
    if variant.firmware == "uefi":
        document.update(loader=_LOADER_CONF, entry=_ENTRY)
    else:
        document.update(variant=variant.name)
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def missing_tools() -> list[str]:
    env_path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [f"{tool} ({package})" for tool, package in TOOLS.items() if shutil.which(tool, path=env_path) is None]


def _run(command: list[str], **kwargs: object) -> None:
    env = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}
    result = subprocess.run(command, capture_output=True, text=True, errors="replace", env=env, check=False, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({result.returncode}):\n{(result.stderr or result.stdout)[-3000:]}")


def build(out: Path, progress: Callable[[str], None] = print, variant: Variant = VARIANTS["uefi"]) -> dict[str, float]:
    """Build the variant's disk into ``out/variant.disk_name``; returns seconds per step."""
    timings: dict[str, float] = {}
    work = out / "work"
    work.mkdir()
    rootfs = work / "root.ext2"
    t0 = time.monotonic()
    progress(f"cloud image ({variant.name}): mmdebstrap")
    outputs = " ".join(f"/vmfix-out/{name}" for name in variant.outputs)
    _run(
        [
            "mmdebstrap", "--mode=auto", "--variant=apt", "--format=ext2",
            "--include=" + ",".join(variant.packages),
            f"--customize-hook=chroot \"$1\" /bin/sh -c {shlex.quote(variant.script)}",
            f"--customize-hook=copy-out {outputs} {work}",
            '--customize-hook=rm -rf "$1/vmfix-out"',
            RELEASE, str(rootfs), MIRROR,
            f"deb {MIRROR} {RELEASE}-updates main",
        ],
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    timings["mmdebstrap"] = time.monotonic() - t0
    t1 = time.monotonic()
    # ext2 -> ext4 of the final size, labelled so the kernel command line and fstab find it.
    _run(["tune2fs", "-O", "extents,uninit_bg,dir_index,has_journal", "-L", ROOT_LABEL, str(rootfs)])
    subprocess.run(["e2fsck", "-f", "-y", str(rootfs)], capture_output=True, check=False)
    _run(["resize2fs", str(rootfs), f"{ROOT_SIZE // 1024}K"])
    raw = work / "disk.raw"
    if variant.firmware == "uefi":
        _assemble_gpt_esp(work, rootfs, raw)
    else:
        _assemble_mbr_grub(work, rootfs, raw)
    _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out / variant.disk_name)])
    timings["assemble"] = time.monotonic() - t1
    shutil.rmtree(work)
    return timings


def _blank(raw: Path, sectors: int) -> None:
    with open(raw, "wb") as handle:
        handle.truncate(sectors * SECTOR)


def _place(raw: Path, part: Path, start: int) -> None:
    """Copy ``part`` into ``raw`` at sector ``start``, keeping holes."""
    _run(["dd", f"if={part}", f"of={raw}", "bs=4M", f"seek={start * SECTOR}", "oflag=seek_bytes", "conv=notrunc,sparse"])


def _assemble_gpt_esp(work: Path, rootfs: Path, raw: Path) -> None:
    """A GPT: ESP first (filled without mounting it), then the root; no BIOS boot partition, so UEFI only."""
    esp = work / "esp.img"
    _run(["mkfs.vfat", "-C", "-F", "32", "-n", "ESP", str(esp), str(ESP_SIZE // 1024)])
    (work / "loader.conf").write_text(_LOADER_CONF)
    (work / "debian.conf").write_text(_ENTRY)
    mtools = ["-i", str(esp)]
    _run(["mmd", *mtools, "::/EFI", "::/EFI/BOOT", "::/loader", "::/loader/entries"])
    for source, target in (
        ("BOOTX64.EFI", "::/EFI/BOOT/BOOTX64.EFI"),
        ("loader.conf", "::/loader/loader.conf"),
        ("debian.conf", "::/loader/entries/debian.conf"),
        ("vmlinuz", "::/vmlinuz"),
        ("initrd.img", "::/initrd.img"),
    ):
        _run(["mcopy", *mtools, str(work / source), target])
    esp_start = 2048
    root_start = esp_start + ESP_SIZE // SECTOR
    _blank(raw, root_start + ROOT_SIZE // SECTOR + 2048)
    layout = (
        "label: gpt\nunit: sectors\n"
        f"start={esp_start}, size={ESP_SIZE // SECTOR}, type={ESP_TYPE}, name=\"EFI\"\n"
        f"start={root_start}, size={ROOT_SIZE // SECTOR}, type={LINUX_TYPE}, name=\"root\"\n"
    )
    _run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(raw)], input=layout)
    _place(raw, esp, esp_start)
    _place(raw, rootfs, root_start)


def _assemble_mbr_grub(work: Path, rootfs: Path, raw: Path) -> None:
    """An MBR with one bootable Linux partition; GRUB's boot sector in the MBR, its core image right after it."""
    root_start = 2048
    core = (work / "core.img").read_bytes()
    if len(core) > (root_start - 1) * SECTOR:
        raise RuntimeError(f"GRUB's core image ({len(core)} bytes) does not fit before the first partition")
    _blank(raw, root_start + ROOT_SIZE // SECTOR)
    layout = f"label: dos\nunit: sectors\nstart={root_start}, size={ROOT_SIZE // SECTOR}, type=83, bootable\n"
    _run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(raw)], input=layout)
    with open(raw, "r+b") as disk:
        # boot.img loads the core image from sector 1 (its default), and the core image's first
        # sector (which grub-mkimage made to load the rest from sector 2 on) does the rest.
        disk.write((work / "boot.img").read_bytes()[:MBR_CODE])
        disk.seek(SECTOR)
        disk.write(core)
    _place(raw, rootfs, root_start)


def ensure(cache: Cache, progress: Callable[[str], None] = print, variant: str = "uefi") -> Path:
    """The test cloud image's qcow2 of that variant, built once per recipe digest into the cache."""
    chosen = VARIANTS[variant]
    key = f"test-cloudimage-{recipe_digest(chosen)[:16]}"

    def create(directory: Path) -> None:
        timings = build(directory, progress, chosen)
        cache.write_manifest(directory, {"kind": "test-cloudimage", "timings": timings}, [chosen.disk_name])

    directory = cache.entry("images", key, create, cache.check_manifest, waiting=lambda: progress("waiting for another build"))
    return directory / chosen.disk_name


if __name__ == "__main__":
    import sys

    target = Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    print(json.dumps(build(target, variant=VARIANTS[sys.argv[2] if len(sys.argv) > 2 else "uefi"])))
