"""The libvirt backend: places guests on hosts, starts, saves, restores and stops their domains."""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import random
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...accel import AccelChoice
from ...errors import BootError, GuestError, SnapshotError
from ...images.image import BuiltImage
from ...runtime import Runtime, session_alive
from ..base import ALL_CAPABILITIES, LanSegment, Machine, MachineConfig, SavedState, start_restored_console
from ..common import (
    PORT_ATTEMPTS,
    TB_SIZE_MB,
    firmware_inputs,
    free_port,
    hotplug_lan,
    kernel_args_key,
    load_incoming,
    port_taken,
)
from .calls import bounded, libvirt, require_libvirt
from .connection import (
    Host,
    HostUnreachable,
    connect,
    drop_domain,
    reap,
    sweep,
    versions_differ,
)
from .console import ConsolePump
from .domain import DEVICES_VERSION, check_template, domain_xml
from .machine import LibvirtMachine
from .names import run_name
from .persistent import SnapshotContext, boot_persistent, network_problems, relearn_address, snapshot_capabilities
from .placement import Placement
from .save import rewrap, save_domain, stream_offset
from .snapshot import revert_clean, revert_named, take_clean, take_named
from .storage import StateCopy, drop_files, host_files
from .uris import DEFAULT_LIBVIRT_NETWORK, DEFAULT_LIBVIRT_POOL, DEFAULT_LIBVIRT_URI

log = logging.getLogger("pytest_vmfixtures")

REMOTE_PORTS = (20000, 60000)  # ports on a remote host cannot be probed from here: pick, retry if taken


class LibvirtBackend:
    name = "libvirt"
    capabilities = ALL_CAPABILITIES  # libvirt's QEMU driver: monitor and agent commands pass through it

    def __init__(
        self, runtime: Runtime, accel: AccelChoice, uris: list[str] | None = None, qemu_img: str = "qemu-img",
        pool: str = DEFAULT_LIBVIRT_POOL, progress: Callable[[str], None] = lambda message: None,
        mode: str = "saved-state", network: str = DEFAULT_LIBVIRT_NETWORK, boot_timeout: float = 600.0,
    ) -> None:
        """``mode``: saved-state (QEMU's saved state restored into new domains) or snapshot (snapshot.py),
        whose guests sit on the libvirt ``network`` and get ``boot_timeout`` to show an address there."""
        require_libvirt()
        self.snapshot_mode = mode == "snapshot"
        self.network = network
        self.boot_timeout = boot_timeout
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors arrive as exceptions, not on stderr
        self.runtime = runtime
        self.accel = accel
        self.qemu_img = qemu_img
        self.pool_name = pool
        self.progress = progress
        self.hosts: list[Host] = []
        self.placement = Placement(self.hosts, progress)
        self.snapshots = SnapshotContext(self.placement, runtime, accel, qemu_img, progress, network, boot_timeout)
        self._copy_ids = itertools.count()
        self._segments: dict[LanSegment, Host] = {}  # each private network's first member's host
        check_template()
        unreachable: list[str] = []
        try:
            for uri in uris or [DEFAULT_LIBVIRT_URI]:
                try:
                    self.hosts.append(connect(uri, self.pool_name, self.snapshot_mode))
                except HostUnreachable as exc:
                    unreachable.append(str(exc))
            if not self.hosts:
                raise HostUnreachable("; ".join(unreachable))
        except BaseException:
            self.close()
            raise
        for reason in unreachable:  # the other hosts take the guests
            log.warning("%s; placing guests on the other libvirt hosts", reason)
            self.progress(f"{reason}; placing guests on the other libvirt hosts")
        differ = None if self.snapshot_mode else versions_differ(self.hosts)  # snapshots stay on their host
        if differ:
            self.close()
            raise GuestError(differ)
        if self.snapshot_mode:
            problem = network_problems(self.hosts, self.network)
            if problem:
                self.close()
                raise GuestError(problem)
            self.capabilities = snapshot_capabilities(self.hosts)
        for host in self.hosts:
            reap(host, lambda session: session_alive(self.runtime.run_root, session))

    def describe(self) -> str:
        host = self.hosts[0]
        where = ", ".join(h.uri for h in self.hosts)
        mode = f", snapshot mode on network {self.network}" if self.snapshot_mode else ""
        return f"libvirt {host.libvirt_version} ({where}), qemu {host.qemu_version}, accel {self.accel.accel}{mode}"

    def state_inputs(self, image: BuiltImage, config: MachineConfig) -> dict[str, object]:
        host = self.hosts[0]
        return {
            "backend": "libvirt",
            "libvirt": host.libvirt_version,
            "qemu": host.qemu_version,
            "accel": self.accel.accel,
            "tb": TB_SIZE_MB,
            "kernel_args": kernel_args_key(vga=image.kernel is not None),  # x86 only, VGA; the built-in images
            "devices": DEVICES_VERSION,
            **({} if image.agent else {"agent": False}),  # no agent channel: other hardware
            **(firmware_inputs(image.firmware) if image.kernel is None else {}),
        }

    def load(self) -> dict[str, int]:
        """Running guests per URI."""
        return self.placement.load()

    # -- starting ------------------------------------------------------------
    def _start(
        self, image: BuiltImage, config: MachineConfig, name: str, backing: Path, state: SavedState | None,
    ) -> LibvirtMachine:
        """Start a domain: booting (``state`` None) or restoring ``state`` (paused; the caller loads and resumes).

        A host whose libvirtd stops answering is marked down and the guest goes to another one.
        """
        domain_name = run_name(self.runtime.session_id, name)
        while True:
            host = self.placement.pick(domain_name, image)
            try:
                return self._start_on(host, image, config, name, domain_name, backing, state)
            except Exception as exc:
                if not self.placement.mark_if_down(host, exc):
                    raise

    def _start_on(
        self, host: Host, image: BuiltImage, config: MachineConfig, name: str, domain_name: str, backing: Path,
        state: SavedState | None,
    ) -> LibvirtMachine:
        files, socks = self.runtime.machine_dirs(name)
        overlay_name = f"{domain_name}.qcow2" if host.storage is not None else "overlay.qcow2"
        paths: dict[str, object] = {}
        try:
            paths = host_files(host.storage, image, backing, overlay_name, files, state, self.qemu_img, self.progress)
            if host.storage is None and image.seed is not None:
                paths["runner"] = socks / "runner"  # vmfx-runner's port (domain.runner_channel)
            if state is not None:
                start_restored_console(state, files / "console.log")
            last_error = ""
            xml = ""
            for _ in range(PORT_ATTEMPTS):
                port = free_port() if host.storage is None else random.randrange(*REMOTE_PORTS)
                copy: StateCopy | None = None
                try:
                    if host.storage is not None and state is not None:
                        domain, xml, copy = self._restore_copy(host, image, config, paths, port, state)
                    else:
                        xml = domain_xml(self.accel, image, config, domain_name, host, paths, port,
                                         incoming=state is not None)
                        paused = state is not None or host.storage is not None
                        create = functools.partial(host.conn.createXML, xml, libvirt.VIR_DOMAIN_START_PAUSED if paused else 0)
                        domain = bounded(f"{name}: starting on {host.uri}", create, 120.0, undo=drop_domain)
                except libvirt.libvirtError as exc:
                    last_error = str(exc.get_error_message())
                    if port_taken(last_error):
                        continue  # the port was taken between our choice and QEMU's bind
                    break
                nvram = paths.get("nvram")
                machine = LibvirtMachine(host, domain, name, files, port, xml, image.agent, backing,
                                         str(paths["overlay"]), nvram if isinstance(nvram, Path) else None,
                                         on_stop=self.placement.forget)
                machine.placed_as = domain_name
                runner = paths.get("runner")
                machine.runner_socket = runner if isinstance(runner, Path) else None
                machine.state_copy = copy
                self.placement.register(machine)
                if host.storage is not None:
                    self._attach_console(machine, resume=state is None)
                return machine
            raise BootError(f"libvirt did not start {domain_name} on {host.uri}", console_tail=last_error,
                            command_line=["libvirt", host.uri, domain_name])
        except BaseException:
            self.placement.release(host, domain_name)
            drop_files(host.storage, overlay_name, files)
            raise

    def _attach_console(self, machine: LibvirtMachine, resume: bool) -> None:
        """Stream a remote guest's console here before it runs, so its first words are kept."""
        try:
            machine.console = ConsolePump(machine.host.uri, machine.domain, machine.console_log)
            if resume:
                machine.domain.resume()
        except BaseException:
            machine.stop()
            raise

    def _restore_copy(
        self, host: Host, image: BuiltImage, config: MachineConfig, paths: dict[str, object], port: int,
        state: SavedState,
    ) -> tuple[Any, str, StateCopy]:
        """Restore ``state`` on a remote host through libvirt, from a RAM copy nobody else is using.

        libvirt wants the restored domain to keep the save image's name and UUID, so
        the domain is named after the copy (still with the session id in it).
        """
        assert host.storage is not None
        copy = self._free_copy(host, state, image, config, paths)
        xml = domain_xml(self.accel, image, config, copy.name, host, paths, port, incoming=False, domain_uuid=copy.uuid)
        try:
            restore = functools.partial(host.conn.restoreFlags, copy.path, xml, libvirt.VIR_DOMAIN_SAVE_PAUSED)
            bounded(f"{copy.name}: restoring on {host.uri}", restore, 300.0,
                    undo=functools.partial(drop_late_restore, host, copy))
            domain = host.conn.lookupByName(copy.name)
        except GuestError:  # past the deadline: the copy stays busy until a late restore's domain is dropped
            raise
        except BaseException:
            copy.busy = False
            raise
        return domain, xml, copy

    def _free_copy(
        self, host: Host, state: SavedState, image: BuiltImage, config: MachineConfig, paths: dict[str, object],
    ) -> StateCopy:
        with self.placement.lock:
            copies = host.copies.setdefault(state.key, [])
            for copy in copies:
                if not copy.busy:
                    copy.busy = True
                    return copy
            name = run_name(self.runtime.session_id, f"{state.key}-{next(self._copy_ids)}")
            copy = StateCopy(str(uuid.uuid4()), name, "")
            copies.append(copy)  # busy while it uploads
        assert host.storage is not None
        try:
            header_xml = domain_xml(self.accel, image, config, name, host, paths, 22, incoming=False,
                                    domain_uuid=copy.uuid)
            chunks, size = rewrap(state.memory, header_xml)
            copy.path = host.storage.upload(f"{name}.save", chunks, size)
        except BaseException:
            with self.placement.lock:
                copies.remove(copy)
            raise
        return copy

    def boot(self, image: BuiltImage, config: MachineConfig, name: str) -> LibvirtMachine:
        if self.snapshot_mode:
            return boot_persistent(self.snapshots, image, config, name)
        return self._start(image, config, name, image.disk, None)

    # -- snapshot mode (persistent.py, snapshot.py) ----------------------------------
    def take_clean(self, machine: Machine) -> None:
        take_clean(self._own(machine))

    def revert_clean(self, machine: Machine) -> None:
        revert_clean(self._own(machine))
        relearn_address(self.snapshots, self._own(machine))

    def take_named(self, machine: Machine, name: str) -> None:
        take_named(self._own(machine), name)

    def revert_named(self, machine: Machine, name: str) -> None:
        revert_named(self._own(machine), name)
        relearn_address(self.snapshots, self._own(machine))

    @staticmethod
    def _own(machine: Machine) -> LibvirtMachine:
        if not isinstance(machine, LibvirtMachine):
            raise TypeError(f"the libvirt backend cannot snapshot {machine!r}")
        return machine

    def restore(self, image: BuiltImage, config: MachineConfig, state: SavedState, name: str) -> LibvirtMachine:
        if self.snapshot_mode:
            raise SnapshotError("the libvirt backend in snapshot mode has no saved states to restore")
        offset = stream_offset(state.memory)
        machine = self._start(image, config, name, state.disk, state)
        try:
            if machine.host.storage is None:  # else libvirt loaded it already (_restore_copy)
                load_incoming(machine, state.memory, offset)
            try:
                machine.domain.resume()  # through libvirt, so its idea of the domain's state stays right
            except libvirt.libvirtError as exc:
                raise SnapshotError(f"{name}: cannot resume the restored guest: {exc.get_error_message()}") from exc
            if machine.state() != "running":
                raise SnapshotError(f"{name}: the restored guest is {machine.state()}, not running")
        except BaseException as exc:
            machine.stop()
            self.placement.mark_if_down(machine.host, exc)
            raise
        return machine

    def save(self, machine: Machine, directory: Path) -> None:
        if self.snapshot_mode:
            raise SnapshotError("the libvirt backend in snapshot mode saves no states (its guests keep snapshots)")
        if not isinstance(machine, LibvirtMachine):
            raise TypeError(f"the libvirt backend cannot save {machine!r}")
        save_domain(machine, directory, self.qemu_img)

    def keep(self, machine: Machine) -> None:
        """close() leaves it running; it carries this run's pid, so a later run's reaper ends it."""
        if isinstance(machine, LibvirtMachine):
            self.placement.keep(machine)

    def attach_lan(self, machine: Machine, segment: LanSegment, mac: str) -> None:
        # libvirt cannot hot-plug an mcast interface, so the NIC goes in through the monitor;
        # the domain is transient and dropped at revert, so libvirt's view need not include it.
        if self.snapshot_mode:  # a NIC libvirt does not know of would also break the revert to the snapshot
            raise GuestError(f"{machine.name}: private networks (vm_network) plug a NIC in through QEMU's monitor, "
                             "which snapshot mode does not use; mark such tests @pytest.mark.vm(needs=[\"qmp\"])")
        if isinstance(machine, LibvirtMachine):
            with self.placement.lock:
                first = self._segments.setdefault(segment, machine.host)
            if first.machine != machine.host.machine:
                raise GuestError(
                    f"{machine.name} runs on {machine.host.uri} ({machine.host.machine}), the other guests of this "
                    f"vm_network on {first.uri} ({first.machine}): a private network is multicast on one "
                    "hypervisor's loopback and cannot span machines; run such tests with one --vm-libvirt-uri"
                )
        hotplug_lan(machine, segment, mac)

    def close(self) -> None:
        for machine in self.placement.machines():
            with contextlib.suppress(Exception):
                machine.stop()
        for host in self.hosts:
            if host.down:
                sweep(host, self.runtime.session_id, self.pool_name)
            for copies in host.copies.values():
                for copy in copies:
                    with contextlib.suppress(Exception):
                        host.storage.delete(f"{copy.name}.save")  # type: ignore[union-attr]
            host.copies.clear()
        for host in self.hosts:
            with contextlib.suppress(Exception):
                host.conn.close()
        self.hosts = self.placement.hosts = []


def drop_late_restore(host: Host, copy: StateCopy, _: object) -> None:
    """A restore that completed after its deadline left a paused domain nobody holds: drop it, free the copy."""
    with contextlib.suppress(libvirt.libvirtError):
        drop_domain(host.conn.lookupByName(copy.name))
    copy.busy = False
