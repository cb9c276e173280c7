"""The libvirt backend: connects its hosts, picks its mode once, and hands the mode the guests.

A thin façade over one of two modes (mode.py): saved-state (saved_state.py, the default) and
snapshot (snapshot_mode.py). What both share stays here: the hosts and the placement of guests
on them, the state key's inputs, keeping a guest, and closing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from ...accel import AccelChoice
from ...errors import GuestError
from ...images.image import BuiltImage
from ...runtime import Runtime, session_alive
from ..base import ALL_CAPABILITIES, LanSegment, Machine, MachineConfig, SavedState
from ..common import TB_SIZE_MB, firmware_inputs, kernel_args_key
from .calls import libvirt, require_libvirt
from .connection import Host, HostUnreachable, reap, sweep
from .domain import DEVICES_VERSION, check_template
from .machine import LibvirtMachine
from .mode import Mode, ModeContext
from .placement import Placement
from .saved_state import SavedStateMode
from .snapshot_mode import SnapshotMode
from .uris import DEFAULT_LIBVIRT_NETWORK, DEFAULT_LIBVIRT_POOL, DEFAULT_LIBVIRT_URI

log = logging.getLogger("pytest_vmfixtures")


class LibvirtBackend:
    name = "libvirt"
    capabilities = ALL_CAPABILITIES  # the mode's, per backend (saved-state: all; snapshot: what its hosts give)

    def __init__(
        self, runtime: Runtime, accel: AccelChoice, uris: list[str] | None = None, qemu_img: str = "qemu-img",
        pool: str = DEFAULT_LIBVIRT_POOL, progress: Callable[[str], None] = lambda message: None,
        mode: str = "saved-state", network: str = DEFAULT_LIBVIRT_NETWORK, boot_timeout: float = 600.0,
    ) -> None:
        """``mode``: saved-state (QEMU's saved state restored into new domains) or snapshot (snapshot_mode.py),
        whose guests sit on the libvirt ``network`` and get ``boot_timeout`` to show an address there."""
        require_libvirt()
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors arrive as exceptions, not on stderr
        self.runtime = runtime
        self.accel = accel
        self.pool_name = pool
        self.progress = progress
        self.hosts: list[Host] = []
        self.placement = Placement(self.hosts, progress)
        ctx = ModeContext(self.placement, runtime, accel, qemu_img, progress)
        self.mode: Mode = SnapshotMode(ctx, network, boot_timeout) if mode == "snapshot" else SavedStateMode(ctx, pool)
        check_template()
        self._connect(uris or [DEFAULT_LIBVIRT_URI])
        problem = self.mode.check_hosts(self.hosts)
        if problem:
            self.close()
            raise GuestError(problem)
        self.capabilities = self.mode.capabilities(self.hosts)
        for host in self.hosts:
            reap(host, lambda session: session_alive(self.runtime.run_root, session))

    def _connect(self, uris: list[str]) -> None:
        """Connect every URI the mode accepts; one that does not answer leaves its guests to the others."""
        unreachable: list[str] = []
        try:
            for uri in uris:
                try:
                    self.hosts.append(self.mode.connect(uri))
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

    def describe(self) -> str:
        host = self.hosts[0]
        where = ", ".join(h.uri for h in self.hosts)
        return (f"libvirt {host.libvirt_version} ({where}), qemu {host.qemu_version}, accel {self.accel.accel}"
                f"{self.mode.describe()}")

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

    def boot(self, image: BuiltImage, config: MachineConfig, name: str) -> LibvirtMachine:
        return self.mode.boot(image, config, name)

    def restore(self, image: BuiltImage, config: MachineConfig, state: SavedState, name: str) -> LibvirtMachine:
        return self.mode.restore(image, config, state, name)

    def save(self, machine: Machine, directory: Path) -> None:
        self.mode.save(_own(machine, "save"), directory)

    # -- snapshots (snapshot mode) ---------------------------------------------
    def take_clean(self, machine: Machine) -> None:
        self.mode.take_clean(_own(machine, "snapshot"))

    def revert_clean(self, machine: Machine) -> None:
        self.mode.revert_clean(_own(machine, "snapshot"))

    def take_named(self, machine: Machine, name: str) -> None:
        self.mode.take_named(_own(machine, "snapshot"), name)

    def revert_named(self, machine: Machine, name: str) -> None:
        self.mode.revert_named(_own(machine, "snapshot"), name)

    def keep(self, machine: Machine) -> None:
        """close() leaves it running; it carries this run's pid, so a later run's reaper ends it."""
        if isinstance(machine, LibvirtMachine):
            self.placement.keep(machine)

    def attach_lan(self, machine: Machine, segment: LanSegment, mac: str) -> None:
        self.mode.attach_lan(machine, segment, mac)

    def close(self) -> None:
        for machine in self.placement.machines():
            with contextlib.suppress(Exception):
                machine.stop()
        for host in self.hosts:
            if host.down:
                sweep(host, self.runtime.session_id, self.pool_name)
        self.mode.close(self.hosts)
        for host in self.hosts:
            with contextlib.suppress(Exception):
                host.conn.close()
        self.hosts = self.placement.hosts = []


def _own(machine: Machine, what: str) -> LibvirtMachine:
    if not isinstance(machine, LibvirtMachine):
        raise TypeError(f"the libvirt backend cannot {what} {machine!r}")
    return machine
