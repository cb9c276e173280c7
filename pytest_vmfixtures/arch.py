"""Guest CPU architectures: what each one is called, and the machine QEMU emulates for it.

One table for the image builder (which QEMU runs a foreign image's second
stage), the QEMU backend (which binary, machine, CPU and console), doctor
(which architectures this host can run) and the options (``--vm-qemu-binary
ARCH=PATH``). Names follow Debian (``arm64``); ``uname`` is what the guest's
``uname -m`` prints, ``family`` the QEMU target (``qemu-system-FAMILY``).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Arch:
    debian: str
    uname: str
    family: str
    qemu_package: str
    machine: str
    console: str
    # A fixed CPU model under TCG: the saved state names it, and "max" would add costly features
    # (pointer authentication on arm64) and change with the QEMU version. None: QEMU's default.
    tcg_cpu: str | None = None
    # Firmware QEMU loads by itself for this machine (RISC-V's OpenSBI), and the package that has it.
    firmware: tuple[str, ...] = ()
    firmware_package: str = ""

    @property
    def qemu_binary(self) -> str:
        return f"qemu-system-{self.family}"

    @property
    def x86(self) -> bool:
        return self.family == "x86_64"


ARCHES: dict[str, Arch] = {
    "amd64": Arch("amd64", "x86_64", "x86_64", "qemu-system-x86", "pc", "ttyS0"),
    "i386": Arch("i386", "i686", "x86_64", "qemu-system-x86", "pc", "ttyS0"),
    "arm64": Arch("arm64", "aarch64", "aarch64", "qemu-system-arm", "virt", "ttyAMA0", tcg_cpu="cortex-a57"),
    # sstc off: QEMU 7.2 does not migrate the supervisor timer compare register, so a restored guest
    # would never get another timer interrupt; without sstc the kernel's timer goes through OpenSBI.
    "riscv64": Arch(
        "riscv64", "riscv64", "riscv64", "qemu-system-misc", "virt", "ttyS0", tcg_cpu="rv64,sstc=off",
        firmware=("/usr/share/qemu/opensbi-riscv64-generic-fw_dynamic.bin",), firmware_package="qemu-system-data",
    ),
}
# What images record as their ``arch`` (the QEMU-side name; a 32-bit x86 guest is "i386").
_IMAGE_ARCH = {"amd64": "x86_64", "i386": "i386", "arm64": "aarch64", "riscv64": "riscv64"}


def by_name(name: str) -> Arch:
    """The architecture a Debian name, ``uname -m`` name or image arch names; KeyError if none."""
    if name in ARCHES:
        return ARCHES[name]
    for debian, image_arch in _IMAGE_ARCH.items():
        if name == image_arch:
            return ARCHES[debian]
    for arch in ARCHES.values():
        if name == arch.uname:
            return arch
    raise KeyError(name)


def image_arch(debian: str) -> str:
    """The ``arch`` an image of Debian architecture ``debian`` records."""
    return _IMAGE_ARCH[debian]


def host_family() -> str:
    """The QEMU target this host's CPU is (x86_64 for i686 and amd64 hosts alike)."""
    machine = platform.machine()
    return {"amd64": "x86_64", "i686": "x86_64", "i386": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def is_native(arch: Arch) -> bool:
    """Whether this host runs the architecture's programs itself (so KVM can run its guests)."""
    return arch.family == host_family()


def missing_firmware(arch: Arch) -> list[str]:
    return [path for path in arch.firmware if not Path(path).is_file()]
