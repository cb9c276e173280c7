"""Saved-state mode (the libvirt backend's default): QEMU's saved state restored into new domains.

A guest boots into a transient domain; its state is saved once (save.py) and restored many times,
each restore a new domain with its own name, UUID, overlay, console and port. On this machine QEMU
gets the state through the monitor (backends/common.load_incoming); on a remote host libvirt
restores it from a per-guest copy uploaded to the host's pool (storage.StateCopy). QEMU's driver
only; its guests have every capability. Snapshots are snapshot mode's (snapshot_mode.py).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import random
import uuid
from pathlib import Path
from typing import Any

from ...errors import BootError, GuestError, SnapshotError
from ...images.image import BuiltImage
from ..base import ALL_CAPABILITIES, LanSegment, Machine, MachineConfig, SavedState, start_restored_console
from ..common import PORT_ATTEMPTS, free_port, hotplug_lan, load_incoming, port_taken
from .calls import bounded, libvirt
from .connection import Host, connect, versions_differ
from .console import ConsolePump
from .domain import domain_xml
from .machine import LibvirtMachine
from .mode import ModeContext
from .names import run_name
from .save import rewrap, save_domain, stream_offset
from .storage import StateCopy, drop_files, host_files
from .teardown import drop_domain

REMOTE_PORTS = (20000, 60000)  # ports on a remote host cannot be probed from here: pick, retry if taken
NO_SNAPSHOTS = ("the libvirt backend in saved-state mode keeps no hypervisor snapshots (its guests restore a "
                "saved state); snapshots are --vm-libvirt-mode snapshot's")


class SavedStateMode:
    """Guests in transient domains on QEMU's driver, restored from saved states, on any number of hosts."""

    def __init__(self, ctx: ModeContext, pool_name: str) -> None:
        self.ctx = ctx
        self.pool_name = pool_name
        self._copy_ids = itertools.count()
        self._segments: dict[LanSegment, Host] = {}  # each private network's first member's host

    def connect(self, uri: str) -> Host:
        return connect(uri, self.pool_name)

    def check_hosts(self, hosts: list[Host]) -> str | None:
        return versions_differ(hosts)

    def capabilities(self, hosts: list[Host]) -> frozenset[str]:
        return ALL_CAPABILITIES  # libvirt's QEMU driver: monitor and agent commands pass through it

    def describe(self) -> str:
        return ""

    def _start(
        self, image: BuiltImage, config: MachineConfig, name: str, backing: Path, state: SavedState | None,
    ) -> LibvirtMachine:
        """Start a domain: booting (``state`` None) or restoring ``state`` (paused; the caller loads and resumes).

        A host whose libvirtd stops answering is marked down and the guest goes to another one.
        """
        domain_name = run_name(self.ctx.runtime.session_id, name)
        while True:
            host = self.ctx.placement.pick(domain_name, image)
            try:
                return self._start_on(host, image, config, name, domain_name, backing, state)
            except Exception as exc:
                if not self.ctx.placement.mark_if_down(host, exc):
                    raise

    def _start_on(
        self, host: Host, image: BuiltImage, config: MachineConfig, name: str, domain_name: str, backing: Path,
        state: SavedState | None,
    ) -> LibvirtMachine:
        files, socks = self.ctx.runtime.machine_dirs(name)
        overlay_name = f"{domain_name}.qcow2" if host.storage is not None else "overlay.qcow2"
        paths: dict[str, object] = {}
        try:
            paths = host_files(host.storage, image, backing, overlay_name, files, state, self.ctx.qemu_img, self.ctx.progress)
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
                        xml = domain_xml(self.ctx.accel, image, config, domain_name, host, paths, port,
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
                                         on_stop=self.ctx.placement.forget)
                machine.placed_as = domain_name
                runner = paths.get("runner")
                machine.runner_socket = runner if isinstance(runner, Path) else None
                machine.state_copy = copy
                self.ctx.placement.register(machine)
                if host.storage is not None:
                    self._attach_console(machine, resume=state is None)
                return machine
            raise BootError(f"libvirt did not start {domain_name} on {host.uri}", console_tail=last_error,
                            command_line=["libvirt", host.uri, domain_name])
        except BaseException:
            self.ctx.placement.release(host, domain_name)
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
        xml = domain_xml(self.ctx.accel, image, config, copy.name, host, paths, port, incoming=False, domain_uuid=copy.uuid)
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
        with self.ctx.placement.lock:
            copies = host.copies.setdefault(state.key, [])
            for copy in copies:
                if not copy.busy:
                    copy.busy = True
                    return copy
            name = run_name(self.ctx.runtime.session_id, f"{state.key}-{next(self._copy_ids)}")
            copy = StateCopy(str(uuid.uuid4()), name, "")
            copies.append(copy)  # busy while it uploads
        assert host.storage is not None
        try:
            header_xml = domain_xml(self.ctx.accel, image, config, name, host, paths, 22, incoming=False,
                                    domain_uuid=copy.uuid)
            chunks, size = rewrap(state.memory, header_xml)
            copy.path = host.storage.upload(f"{name}.save", chunks, size)
        except BaseException:
            with self.ctx.placement.lock:
                copies.remove(copy)
            raise
        return copy

    def boot(self, image: BuiltImage, config: MachineConfig, name: str) -> LibvirtMachine:
        return self._start(image, config, name, image.disk, None)

    def restore(self, image: BuiltImage, config: MachineConfig, state: SavedState, name: str) -> LibvirtMachine:
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
            self.ctx.placement.mark_if_down(machine.host, exc)
            raise
        return machine

    def save(self, machine: LibvirtMachine, directory: Path) -> None:
        save_domain(machine, directory, self.ctx.qemu_img)

    def attach_lan(self, machine: Machine, segment: LanSegment, mac: str) -> None:
        # libvirt cannot hot-plug an mcast interface, so the NIC goes in through the monitor;
        # the domain is transient and dropped at revert, so libvirt's view need not include it.
        if isinstance(machine, LibvirtMachine):
            with self.ctx.placement.lock:
                first = self._segments.setdefault(segment, machine.host)
            if first.machine != machine.host.machine:
                raise GuestError(
                    f"{machine.name} runs on {machine.host.uri} ({machine.host.machine}), the other guests of this "
                    f"vm_network on {first.uri} ({first.machine}): a private network is multicast on one "
                    "hypervisor's loopback and cannot span machines; run such tests with one --vm-libvirt-uri"
                )
        hotplug_lan(machine, segment, mac)

    def take_clean(self, machine: LibvirtMachine) -> None:
        raise SnapshotError(f"{machine.name}: {NO_SNAPSHOTS}")

    def revert_clean(self, machine: LibvirtMachine) -> None:
        raise SnapshotError(f"{machine.name}: {NO_SNAPSHOTS}")

    def take_named(self, machine: LibvirtMachine, name: str) -> None:
        raise SnapshotError(f"{machine.name}: {NO_SNAPSHOTS}")

    def revert_named(self, machine: LibvirtMachine, name: str) -> None:
        raise SnapshotError(f"{machine.name}: {NO_SNAPSHOTS}")

    def close(self, hosts: list[Host]) -> None:
        """Delete the RAM copies uploaded to remote hosts' pools."""
        for host in hosts:
            for copies in host.copies.values():
                for copy in copies:
                    with contextlib.suppress(Exception):
                        host.storage.delete(f"{copy.name}.save")  # type: ignore[union-attr]
            host.copies.clear()


def drop_late_restore(host: Host, copy: StateCopy, _: object) -> None:
    """A restore that completed after its deadline left a paused domain nobody holds: drop it, free the copy."""
    with contextlib.suppress(libvirt.libvirtError):
        drop_domain(host.conn.lookupByName(copy.name))
    copy.busy = False
