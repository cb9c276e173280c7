"""The QEMU command line of one guest, and the files it names. Pure: every input is a parameter."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...accel import AccelChoice
from ...arch import ARCHES, Arch, by_name
from ...channels.runner import PORT_NAME as RUNNER_PORT
from ...errors import GuestError
from ...images.image import BuiltImage
from ..base import MachineConfig
from ..common import NVRAM_NAME, TB_SIZE_MB, find_ovmf, kernel_command_line, mac_for, opt
from .balloon import BALLOON_DEVICE, reports_free_pages
from .memory import RamFile
from .riscv import gdb_arguments

__all__ = ["MachinePaths", "build_command_line", "guest_arch"]


@dataclass(frozen=True)
class MachinePaths:
    files: Path
    socks: Path

    @property
    def overlay(self) -> Path:
        return self.files / "overlay.qcow2"

    @property
    def console(self) -> Path:
        return self.files / "console.log"

    @property
    def stderr(self) -> Path:
        return self.files / "qemu.log"

    @property
    def pidfile(self) -> Path:
        return self.files / "pid"

    @property
    def nvram(self) -> Path:
        """A UEFI guest's variable store: an overlay, like the disk, and saved with it."""
        return self.files / NVRAM_NAME

    @property
    def ram(self) -> Path:
        """A cold boot's RAM, when its state is to be mapped (see memory.py)."""
        return self.files / "ram"

    @property
    def qmp(self) -> Path:
        return self.socks / "qmp"

    @property
    def agent(self) -> Path:
        return self.socks / "qga"

    @property
    def runner(self) -> Path:
        """vmfx-runner's port (your own images' guests; channels/runner.py)."""
        return self.socks / "runner"

    @property
    def gdb(self) -> Path:
        return self.socks / "gdb"


def guest_arch(image: BuiltImage) -> Arch:
    """The architecture an image was built for, or a GuestError naming it."""
    try:
        return by_name(image.arch)
    except KeyError:
        raise GuestError(f"image {image.name!r} is for architecture {image.arch!r}, which this plugin cannot run; "
                         f"use one of {', '.join(ARCHES)}") from None


def build_command_line(
    binary: str,
    image: BuiltImage,
    config: MachineConfig,
    accel: AccelChoice,
    paths: MachinePaths,
    ssh_port: int,
    *,
    incoming: bool = False,
    name: str = "guest",
    ram: RamFile | None = None,
) -> list[str]:
    """The QEMU argv. Pure: every input is a parameter, so it is unit-tested.

    Everything that is part of the migrated device state is identical between
    a cold boot and a restore (the MAC included); only file paths, the
    forwarded port and ``-incoming`` differ. ``ram``: the guest's RAM is that file (a mapped state's;
    see memory.py), and the balloon that would punch holes in it is left out.

    The order of the steps below is the order of QEMU's devices, which a saved state depends on.
    """
    arch = guest_arch(image)
    argv = [binary, "-name", f"guest={name},debug-threads=on", "-no-user-config", "-nodefaults"]
    argv += _machine_args(arch, config, accel, ram)
    argv += ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    argv += _boot_args(arch, image, paths)
    argv += _disk_args(image, paths)
    argv += _net_args(arch, config, ssh_port)
    argv += _chardev_args(image, paths, incoming)
    if reports_free_pages(image) and ram is None:
        # Last, so the slots of the devices above stay where they were before it came.
        argv += ["-device", BALLOON_DEVICE]
    if arch.family == "riscv64":
        argv += gdb_arguments(paths.gdb)  # to re-arm the timer after a restore (see riscv.py)
    if incoming:
        argv += ["-incoming", "defer"]
    return argv


def _machine_args(arch: Arch, config: MachineConfig, accel: AccelChoice, ram: RamFile | None) -> list[str]:
    """The machine type, its memory and CPUs, the RAM file that backs it, the accelerator and CPU model."""
    machine = arch.machine if ram is None else f"{arch.machine},memory-backend=ram0"
    argv = ["-machine", machine, "-display", "none", "-m", str(config.memory_mb), "-smp", str(config.cpus)]
    if ram is not None:
        argv += ram.arguments(config.memory_mb)
    if accel.accel == "kvm":
        argv += ["-accel", "kvm", "-cpu", "host"]
    else:
        argv += ["-accel", f"tcg,tb-size={TB_SIZE_MB}"]
        if arch.tcg_cpu:
            argv += ["-cpu", arch.tcg_cpu]
    return argv


def _boot_args(arch: Arch, image: BuiltImage, paths: MachinePaths) -> list[str]:
    """The image's kernel booted directly, or UEFI's two flash drives (code, and the guest's variables)."""
    if image.kernel is not None:
        argv = ["-kernel", str(image.kernel), "-append", kernel_command_line(image.cmdline, vga=arch.x86)]
        if image.initrd is not None:
            argv += ["-initrd", str(image.initrd)]
        return argv
    if image.firmware == "uefi":
        code, _ = find_ovmf()
        return [
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={opt(code)}",
            # qcow2, so savevm (vm.snapshot) can snapshot it with the disk
            "-drive", f"if=pflash,format=qcow2,unit=1,file={opt(paths.nvram)}",
        ]
    return []


def _disk_args(image: BuiltImage, paths: MachinePaths) -> list[str]:
    """The guest's overlay, and a cloud image's seed."""
    argv = [
        "-drive", f"file={opt(paths.overlay)},if=none,id=disk0,format=qcow2,cache=unsafe,discard=unmap",
        "-device", "virtio-blk-pci,drive=disk0" + (",bootindex=0" if image.kernel is None else ""),
    ]
    if image.seed is not None:  # cloud-init's NoCloud seed, a read-only CD
        argv += [
            "-device", "virtio-scsi-pci,id=scsi0",
            "-drive", f"file={opt(image.seed)},if=none,id=seed0,format=raw,readonly=on,media=cdrom",
            "-device", "scsi-cd,drive=seed0,bus=scsi0.0",
        ]
    return argv


def _net_args(arch: Arch, config: MachineConfig, ssh_port: int) -> list[str]:
    """User-mode network with the SSH forward on loopback, the NIC, the RNG and (x86) a VGA to screendump."""
    restrict = "on" if config.network == "restricted" else "off"
    argv = [
        "-netdev", f"user,id=net0,restrict={restrict},hostfwd=tcp:127.0.0.1:{ssh_port}-:22",
        "-device", f"virtio-net-pci,netdev=net0,mac={mac_for(config.label)}",
        "-device", "virtio-rng-pci",
    ]
    if arch.x86:
        argv += ["-device", "VGA"]  # something to screendump when a test fails (other machines have no VGA console)
    return argv


def _chardev_args(image: BuiltImage, paths: MachinePaths, incoming: bool) -> list[str]:
    """The serial console's log, the QMP socket and, if the image has one, the guest agent's channel (and on your
    own images vmfx-runner's)."""
    argv = [
        # A restore appends to the console log its state's boot console begins (start_restored_console).
        "-chardev", f"file,id=serial0,path={opt(paths.console)}" + (",append=on" if incoming else ""),
        "-serial", "chardev:serial0",
        "-chardev", f"socket,id=qmp,path={opt(paths.qmp)},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
    ]
    if image.agent:
        argv += [
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=qga0,path={opt(paths.agent)},server=on,wait=off",
            "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ]
        if image.seed is not None:  # your own image: vmfx-runner's port beside the agent's (channels/runner.py)
            argv += [
                "-chardev", f"socket,id=runner0,path={opt(paths.runner)},server=on,wait=off",
                "-device", f"virtserialport,chardev=runner0,name={RUNNER_PORT}",
            ]
    return argv
