"""What both backends build a machine from, and the mechanisms they share (one copy of each).

The kernel and TCG settings here are part of every saved state's key (each
backend's ``state_inputs``), so both backends must use these very values.
Shared mechanisms: option quoting (``opt``), the port retry (``PORT_ATTEMPTS``,
``port_taken``), a guest's own disks on this machine (``guest_disks``: overlay and
UEFI NVRAM), loading a saved state over QMP (``load_incoming``) and a QEMU log's
last lines (``log_tail``).
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

from ..errors import GuestError, SnapshotError
from ..images.image import BuiltImage
from ..waiting import wait_for
from .base import LanSegment, Machine, SavedState

TB_SIZE_MB = 128  # TCG translation cache: bounds QEMU's RSS beyond guest RAM
# Pages the guest frees are zeroed, so after it drops its caches a saved state
# holds only the memory in use: zero pages cost nothing to save or restore.
KERNEL_ARGS = "init_on_free=1"
# Machines with a VGA display (x86) also show the kernel's console there, so that a failed test's
# screendump shows something. It goes first: the last console= (the recipe's serial port) stays
# /dev/console, where systemd and the boot checks read.
SCREEN_CONSOLE = "console=tty0"


def kernel_command_line(cmdline: str, vga: bool) -> str:
    """What the guest kernel is started with: the recipe's line, the screen console where there is one, KERNEL_ARGS."""
    return f"{SCREEN_CONSOLE} {cmdline} {KERNEL_ARGS}" if vga else f"{cmdline} {KERNEL_ARGS}"


def kernel_args_key(vga: bool) -> str:
    """The kernel arguments' part of a saved state's key: with ``vga`` (a VGA machine booting the image's own
    kernel, i.e. a built-in x86 image), the screen console and the login prompt pool.screen_login starts.
    Firmware-booted images (your own) keep their key: neither reaches them."""
    return f"{SCREEN_CONSOLE} {KERNEL_ARGS}" if vga else KERNEL_ARGS

# UEFI firmware for images that boot through it (Debian/Ubuntu: package ovmf; Fedora: edk2-ovmf).
# The code is read-only; each guest gets a qcow2 overlay of the variable store as its NVRAM.
OVMF_CANDIDATES = (
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
)


def find_ovmf() -> tuple[Path, Path]:
    """The OVMF code and variable-store template, or a GuestError saying what to install."""
    for code, variables in OVMF_CANDIDATES:
        if Path(code).is_file() and Path(variables).is_file():
            return Path(code), Path(variables)
    raise GuestError("this image boots with UEFI, and no OVMF firmware was found: install it (Debian: apt install ovmf)")


def firmware_inputs(firmware: str) -> dict[str, object]:
    """What a firmware-booted guest's saved state depends on: the firmware, and OVMF's bytes."""
    inputs: dict[str, object] = {"firmware": firmware}
    if firmware == "uefi":
        inputs["ovmf"] = [hashlib.sha256(p.read_bytes()).hexdigest() for p in find_ovmf()]
    return inputs


def opt(path: object) -> str:
    """A path as a value in QEMU's ``key=value,...`` option syntax, where a comma is written twice."""
    return str(path).replace(",", ",,")


# A guest's SSH port is forwarded from 127.0.0.1: chosen free, it can be taken before QEMU binds it,
# so a start is tried this many times (on a remote host, where nothing can be probed, as often).
PORT_ATTEMPTS = 5


def port_taken(message: str) -> bool:
    """Whether QEMU's (or libvirt's report of QEMU's) complaint says the forwarded port was taken."""
    return "hostfwd" in message or "host forwarding" in message


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def create_overlay(qemu_img: str, backing: Path, overlay: Path, backing_format: str = "qcow2") -> None:
    """A new qcow2 file ``overlay`` whose reads fall through to ``backing`` (left untouched)."""
    result = subprocess.run(
        [qemu_img, "create", "-q", "-f", "qcow2", "-F", backing_format, "-b", str(backing), str(overlay)],
        capture_output=True, text=True, timeout=60,
    )
    if result.returncode != 0:
        raise GuestError(f"cannot create overlay {overlay}: {result.stderr.strip()}")


NVRAM_NAME = "nvram.qcow2"  # a UEFI guest's variable store, in its files and in a saved state's directory


def create_nvram(qemu_img: str, nvram: Path, state_directory: Path | None) -> None:
    """A UEFI guest's own NVRAM: a qcow2 overlay over OVMF's variable-store template at a cold boot,
    over the variables frozen with the state at a restore (qcow2, so savevm snapshots it with the disk)."""
    if state_directory is not None:
        create_overlay(qemu_img, state_directory / NVRAM_NAME, nvram)
    else:
        create_overlay(qemu_img, find_ovmf()[1], nvram, "raw")


def guest_disks(qemu_img: str, image: BuiltImage, backing: Path, overlay: Path, nvram: Path,
                state: SavedState | None) -> Path | None:
    """A guest's own writable files on this machine: ``overlay`` over ``backing``, and a UEFI guest's ``nvram``.

    A cold boot overlays the image itself (raw or qcow2); a restore, the state's frozen qcow2 layer.
    The NVRAM is disk state too (boot entries, variables the guest wrote): a cold boot starts from
    OVMF's template, a restore from the variables frozen with the state. Returns the NVRAM, or None.
    """
    create_overlay(qemu_img, backing, overlay, "qcow2" if state is not None else image.disk_format)
    if image.kernel is None and image.firmware == "uefi":
        create_nvram(qemu_img, nvram, state.directory if state is not None else None)
        return nvram
    return None


def load_incoming(machine: Machine, memory: Path, offset: int = 0,
                  before: Callable[[], None] | None = None) -> None:
    """Load a saved state into ``machine``, started with ``-incoming defer``; it is left as the load left it.

    QEMU gets the migration stream (``memory`` from ``offset``) as a file descriptor through the monitor;
    ``before`` runs just before the migration starts (a mapped state's capability). The load must end
    with the guest paused or running and its QEMU alive, else a SnapshotError says how it ended.
    """
    name = machine.name
    fd = os.open(memory, os.O_RDONLY)
    try:
        os.lseek(fd, offset, os.SEEK_SET)
        machine.qmp.send_fd(fd, "state")
    finally:
        os.close(fd)
    if before is not None:
        before()
    machine.qmp.execute("migrate-incoming", {"uri": "fd:state"})

    def loaded() -> bool | None:
        if not machine.alive():
            raise SnapshotError(f"{name}: saved state did not load: {machine.exit_description()}")
        status = machine.qmp.execute("query-status")["status"]
        if status in ("inmigrate", "prelaunch"):
            return None
        if status not in ("paused", "running"):
            info = machine.qmp.execute("query-migrate")
            raise SnapshotError(f"{name}: loading the saved state ended in {status}: {info}")
        return True

    wait_for(f"{name}: loading saved state", loaded, 120.0, interval=0.01, error=SnapshotError)


def log_tail(path: Path, lines: int = 10) -> str:
    """The last ``lines`` of a QEMU log on one line (`` | `` between them), for an error message; "" if unreadable."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(text.strip().splitlines()[-lines:])


def mac_for(name: str) -> str:
    digest = hashlib.sha256(name.encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def hotplug_lan(machine: Machine, segment: LanSegment, mac: str) -> None:
    """A virtio NIC on the segment's multicast group, plugged into the running guest through QMP."""
    netdev = f"lan{mac.replace(':', '')[-6:]}"
    machine.qmp.execute("netdev_add", {"type": "socket", "id": netdev, "mcast": segment.endpoint, "localaddr": "127.0.0.1"})
    machine.qmp.execute("device_add", {"driver": "virtio-net-pci", "netdev": netdev, "mac": mac, "id": f"{netdev}-nic"})


def run_qemu_img(qemu_img: str, *args: str) -> None:
    """``qemu-img ARGS``; its complaint becomes a GuestError."""
    result = subprocess.run([qemu_img, *args], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise GuestError(f"qemu-img {args[0]} failed: {result.stderr.strip()}")
