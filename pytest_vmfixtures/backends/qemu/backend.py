"""The QEMU backend's machines and backend: processes started and watched here, states moved over QMP."""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import re
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from ...accel import AccelChoice, guest_accel
from ...arch import ARCHES, is_native
from ...channels.agent import AgentTransport
from ...channels.qmp import QMP
from ...errors import BootError, GuestError, SnapshotError, VMError
from ...images.image import BuiltImage
from ...runtime import Runtime
from ...waiting import wait_for
from ..base import ALL_CAPABILITIES, LanSegment, Machine, MachineConfig, SavedState, start_restored_console
from ..common import (
    NVRAM_NAME,
    PORT_ATTEMPTS,
    TB_SIZE_MB,
    firmware_inputs,
    free_port,
    guest_disks,
    hotplug_lan,
    kernel_args_key,
    load_incoming,
    log_tail,
    port_taken,
)
from . import memory
from .balloon import BALLOON_DEVICE, reports_free_pages, wait_for_reports
from .command import MachinePaths, build_command_line, guest_arch
from .memory import RamFile
from .riscv import rearm_timers

DEFAULT_BINARY = "qemu-system-x86_64"


def qemu_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise GuestError(f"cannot run {binary}: {exc}; install QEMU (apt install {qemu_package(binary)})") from exc
    match = re.search(r"version (\S+)", out)
    return match.group(1) if match else out.strip()


def qemu_package(binary: str) -> str:
    """The Debian package with ``binary`` (by its qemu-system-FAMILY name)."""
    family = Path(binary).name.removeprefix("qemu-system-")
    return next((a.qemu_package for a in ARCHES.values() if a.family == family), "qemu-system-x86")


def host_cpu_id() -> str:
    """KVM states carry the host CPU model (-cpu host): one host's state must not load on another CPU."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    model = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    return hashlib.sha256(f"{model and model.group(1)}|{flags and flags.group(1)}".encode()).hexdigest()[:16]


class QemuMachine:
    """A QEMU process and the files it owns."""

    def __init__(
        self, name: str, process: subprocess.Popen[bytes], paths: MachinePaths, argv: list[str], ssh_port: int, has_agent: bool,
        riscv_harts: int = 0, ram: RamFile | None = None,
    ) -> None:
        self.name = name
        self.process = process
        self.paths = paths
        self._argv = argv
        self.ssh_host = "127.0.0.1"
        self.ssh_proxy: str | None = None
        self.ssh_port = ssh_port
        self.console_log = paths.console
        self.agent_socket = paths.agent if has_agent else None
        self.agent_transport: AgentTransport | None = None
        self.runner_socket: Path | None = None  # vmfx-runner's port, on your own images' guests (set by the backend)
        self.qmp = QMP(paths.qmp, name)
        self._riscv_harts = riscv_harts  # > 0: a RISC-V guest, whose timer a state load loses
        self.ram = ram  # its RAM is this file (memory.py); None: QEMU's own anonymous memory
        self._stopped = False

    @property
    def command_line(self) -> list[str]:
        return list(self._argv)

    def alive(self) -> bool:
        return self.process.poll() is None

    def after_load(self) -> None:
        if self._riscv_harts:
            rearm_timers(self.paths.gdb, self.name, self._riscv_harts)

    def exit_description(self) -> str:
        code = self.process.poll()
        if code is None:
            return "still running"
        if code < 0:
            try:
                what = f"killed by signal {-code} ({signal.Signals(-code).name})"
            except ValueError:
                what = f"killed by signal {-code}"
        else:
            what = f"exited with status {code}"
        last = self.stderr_tail(3)
        return f"QEMU {what}" + (f": {last}" if last else "")

    def stderr_tail(self, lines: int = 10) -> str:
        return log_tail(self.paths.stderr, lines)

    def connect_qmp(self, timeout: float) -> None:
        """Connect once QEMU accepts: the socket file appears a moment before QEMU listens on it."""

        def connected() -> bool | None:
            if not self.alive():
                raise GuestError(f"{self.name}: {self.exit_description()}")
            if not self.paths.qmp.exists():
                return None
            try:
                self.qmp.connect(min(5.0, timeout))
            except GuestError:
                self.qmp = QMP(self.paths.qmp, self.name)  # a failed client cannot be reused
                return None
            return True

        wait_for(f"{self.name}: QMP", connected, timeout, interval=0.01)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.qmp.close()
        if self.alive():
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except OSError:
                self.process.kill()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            pass
        # paths.ram is a cold boot's RAM file (a restore maps the state's and never writes it).
        for path in (self.paths.overlay, self.paths.nvram, self.paths.ram, self.paths.qmp, self.paths.agent,
                     self.paths.runner, self.paths.pidfile):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError:
                pass  # logged by the owner's cleanup summary if it matters


def _close_fd(ram: RamFile | None) -> None:
    if ram is not None and ram.fd is not None:
        with contextlib.suppress(OSError):
            os.close(ram.fd)


class QemuBackend:
    name = "qemu"
    capabilities = ALL_CAPABILITIES

    def __init__(
        self, runtime: Runtime, accel: AccelChoice, binary: str = DEFAULT_BINARY, qemu_img: str = "qemu-img",
        binaries: dict[str, str] | None = None, ram_state: str = "auto",
    ) -> None:
        """``binary`` runs x86 guests; ``binaries`` maps other QEMU targets (``aarch64``) to their emulators;
        ``ram_state`` is how states keep guest RAM (memory.RAM_STATES)."""
        self.runtime = runtime
        self.accel = accel
        self.binary = binary
        self.binaries = {**(binaries or {}), "x86_64": binary}
        self.qemu_img = qemu_img
        self.ram_state = ram_state
        self.version = qemu_version(binary)
        self._versions = {binary: self.version}

    def describe(self) -> str:
        return f"qemu {self.version}, accel {self.accel.accel} ({self.accel.reason})"

    def binary_for(self, image: BuiltImage) -> str:
        arch = guest_arch(image)
        return self.binaries.get(arch.family, arch.qemu_binary)

    def accel_for(self, image: BuiltImage) -> AccelChoice:
        arch = guest_arch(image)
        return guest_accel(self.accel, is_native(arch), arch.uname)

    def ram_for(self, image: BuiltImage) -> str:
        """``mapped`` or ``stream``: how the states of ``image``'s guests keep their RAM (memory.chosen)."""
        return memory.chosen(self.ram_state, image, self._version_of(self.binary_for(image)))

    def _version_of(self, binary: str) -> str:
        if binary not in self._versions:
            self._versions[binary] = qemu_version(binary)
        return self._versions[binary]

    def state_inputs(self, image: BuiltImage, config: MachineConfig) -> dict[str, object]:
        arch, accel = guest_arch(image), self.accel_for(image)
        inputs: dict[str, object] = {
            "backend": "qemu",
            "qemu": self._version_of(self.binary_for(image)),
            "accel": accel.accel,
            "tb": TB_SIZE_MB,
            # the screen console goes on x86 guests that boot their kernel directly (the built-in images)
            "kernel_args": kernel_args_key(vga=arch.x86 and image.kernel is not None),
            "devices": 2,  # bump when the device set in build_command_line changes
        }
        if not arch.x86:  # x86 states keep the keys they had before other architectures came
            inputs["machine"] = [arch.machine, arch.tcg_cpu]
        if accel.accel == "kvm":
            inputs["cpu"] = host_cpu_id()
        if image.kernel is None:  # firmware boot: the firmware is part of the machine
            inputs.update(firmware_inputs(image.firmware))
        mapped = self.ram_for(image) == "mapped"
        if reports_free_pages(image) and not mapped:  # a device more: states made before it came would not load
            inputs["balloon"] = "free-page-reporting"
        if mapped:  # stream states keep the keys they had before mapped ones came
            inputs["ram"] = "mapped"
        return inputs

    # -- starting ---------------------------------------------------------
    def _overlay(self, image: BuiltImage, backing: Path, paths: MachinePaths, state: SavedState | None) -> None:
        """The guest's overlay and, for a UEFI guest, its NVRAM (common.guest_disks)."""
        guest_disks(self.qemu_img, image, backing, paths.overlay, paths.nvram, state)

    def _launch(
        self, image: BuiltImage, config: MachineConfig, name: str, backing: Path, incoming: bool, state: SavedState | None = None
    ) -> QemuMachine:
        files, socks = self.runtime.machine_dirs(name)
        paths = MachinePaths(files, socks)

        def guest_files() -> RamFile | None:
            """The guest's own files (remade for a retry: a stopped machine's are removed)."""
            _close_fd(opened[-1] if opened else None)
            ram = self._ram(image, config, paths, state)  # first: a changed RAM file is refused before anything is made
            opened.append(ram)
            try:
                self._overlay(image, backing, paths, state)
            except BaseException:
                if ram is not None and ram.shared:  # a cold boot's own RAM file, all its blocks reserved
                    paths.ram.unlink(missing_ok=True)
                raise
            return ram

        opened: list[RamFile | None] = []
        try:
            return self._start(image, config, name, paths, incoming, state, guest_files)
        finally:
            _close_fd(opened[-1] if opened else None)  # QEMU has it open by now, or it is not needed any more

    def _start(self, image: BuiltImage, config: MachineConfig, name: str, paths: MachinePaths, incoming: bool,
               state: SavedState | None, guest_files: Callable[[], RamFile | None]) -> QemuMachine:
        """Start QEMU on the guest's files (retried on a port another process took meanwhile)."""
        ram = guest_files()
        if state is not None:
            start_restored_console(state, paths.console)
        last_error = ""
        for attempt in range(1, PORT_ATTEMPTS + 1):
            port = free_port()
            argv = build_command_line(self.binary_for(image), image, config, self.accel_for(image), paths, port,
                                      incoming=incoming, name=name, ram=ram)
            with open(paths.stderr, "wb") as stderr:
                process = self.runtime.spawn(argv, stderr, paths.pidfile,
                                             pass_fds=(ram.fd,) if ram is not None and ram.fd is not None else ())
            harts = config.cpus if guest_arch(image).family == "riscv64" else 0
            machine = QemuMachine(name, process, paths, argv, port, image.agent, riscv_harts=harts, ram=ram)
            machine.runner_socket = paths.runner if image.agent and image.seed is not None else None
            try:
                machine.connect_qmp(30.0)
                return machine
            except VMError:  # a GuestError, or WaitTimeout when the monitor never answers
                last_error = machine.stderr_tail()
                machine.stop()
                if attempt < PORT_ATTEMPTS and port_taken(last_error):
                    ram = guest_files()
                    continue  # the port was taken between our probe and QEMU's bind
                break
            except BaseException:  # interrupted: the process and its overlay must not outlive this call
                machine.stop()
                raise
        raise BootError(f"QEMU for {name} did not start", console_tail=last_error, command_line=argv)

    def _ram(self, image: BuiltImage, config: MachineConfig, paths: MachinePaths, state: SavedState | None) -> RamFile | None:
        """The file backing the guest's RAM: a cold boot of a mapped state's guest writes its own, a
        restore maps its state's (checked unchanged first); None for stream states."""
        version = self._version_of(self.binary_for(image))
        if state is None:
            if self.ram_for(image) != "mapped":
                return None
            memory.allocate(paths.ram, config.memory_mb)
            return RamFile(paths.ram, shared=True)
        if memory.ram_of(state) is None:
            return None
        ram, fd = memory.check(state)
        try:
            memory.make_openable(fd, version)
        except OSError as exc:
            os.close(fd)
            raise SnapshotError(f"saved state {state.key}: cannot make its RAM file {ram} openable: {exc}") from None
        return RamFile(ram, shared=False, read_only=memory.opens_read_only(version), fd=fd)

    def boot(self, image: BuiltImage, config: MachineConfig, name: str) -> QemuMachine:
        return self._launch(image, config, name, image.disk, incoming=False)

    def restore(self, image: BuiltImage, config: MachineConfig, state: SavedState, name: str) -> QemuMachine:
        machine = self._launch(image, config, name, state.disk, incoming=True, state=state)
        try:
            self._load_state(machine, state)
        except VMError as exc:
            detail = machine.exit_description() if not machine.alive() else str(exc)
            machine.stop()
            raise SnapshotError(f"{name}: saved state {state.key} did not load: {detail}") from exc
        except BaseException:
            machine.stop()
            raise
        return machine

    @staticmethod
    def _load_state(machine: QemuMachine, state: SavedState) -> None:
        ram = machine.ram
        # A mapped state's RAM is its file, not in the stream: the capability says so before the load.
        load_incoming(machine, state.memory, before=None if ram is None else lambda: memory.enable_capability(machine.qmp))
        machine.qmp.execute("cont")
        machine.after_load()

    def save(self, machine: Machine, directory: Path) -> None:
        if not isinstance(machine, QemuMachine):
            raise TypeError(f"the QEMU backend cannot save {machine!r}")
        if BALLOON_DEVICE in machine.command_line:
            wait_for_reports(machine.name, machine.process.pid)  # see balloon.py
        qmp = machine.qmp
        qmp.execute("stop")
        if machine.ram is not None:
            memory.enable_capability(qmp)  # the RAM file is the state's RAM: the stream carries the devices
        fd = os.open(directory / "memory", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            qmp.send_fd(fd, "save")
        finally:
            os.close(fd)
        qmp.execute("migrate", {"uri": "fd:save"})

        def done() -> bool | None:
            info = qmp.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return True
            if status in ("failed", "cancelled"):
                raise SnapshotError(f"{machine.name}: saving state failed: {info.get('error-desc', status)}")
            return None

        wait_for(f"{machine.name}: saving state", done, 300.0, interval=0.02, error=SnapshotError)
        try:
            qmp.execute("quit")
        except GuestError:
            pass  # quitting closes the monitor under our feet
        try:
            machine.process.wait(30)
        except subprocess.TimeoutExpired:
            machine.stop()
            raise SnapshotError(f"{machine.name}: QEMU did not exit within 30 s after saving its state") from None
        os.replace(machine.paths.overlay, directory / "disk.qcow2")
        if machine.ram is not None:
            memory.freeze(machine.ram.path, directory)
        if machine.paths.nvram.exists():
            # A UEFI guest's variable store is frozen with its disk; restore() overlays it per instance.
            os.replace(machine.paths.nvram, directory / NVRAM_NAME)
        machine.stop()

    def attach_lan(self, machine: Machine, segment: LanSegment, mac: str) -> None:
        hotplug_lan(machine, segment, mac)

    def keep(self, machine: Machine) -> None:
        """Nothing to do: the backend stops no guests at close (the session's runtime owns the processes)."""

    def close(self) -> None:
        pass
