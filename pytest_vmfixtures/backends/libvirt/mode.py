"""The libvirt backend's two modes behind one interface, one class per mode.

``SavedStateMode`` (saved_state.py): QEMU's saved state, restored into new transient domains.
``SnapshotMode`` (snapshot_mode.py): each guest a persistent domain on a libvirt network,
reverted by the hypervisor's own snapshot. The backend (backend.py) makes one of them when it is
made and hands it every call that differs between the modes; an operation a mode does not have
is refused by that mode, in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ...accel import AccelChoice
from ...images.image import BuiltImage
from ...runtime import Runtime
from ..base import LanSegment, Machine, MachineConfig, SavedState
from .connection import Host
from .machine import LibvirtMachine
from .placement import Placement


@dataclass(frozen=True)
class ModeContext:
    """What a mode needs of the backend: its placement of guests on hosts and the run's settings."""

    placement: Placement
    runtime: Runtime
    accel: AccelChoice
    qemu_img: str
    progress: Callable[[str], None]


class Mode(Protocol):
    def connect(self, uri: str) -> Host:
        """Open ``uri`` and check it can run this mode's guests (HostUnreachable: the others take them)."""
        ...

    def check_hosts(self, hosts: list[Host]) -> str | None:
        """Why these connected hosts cannot run this mode's guests together, or None."""
        ...

    def capabilities(self, hosts: list[Host]) -> frozenset[str]:
        """What every host's guests have in this mode (backends.base.CAPABILITIES)."""
        ...

    def describe(self) -> str:
        """What the backend's one-line description adds for this mode ("" for the default)."""
        ...

    def boot(self, image: BuiltImage, config: MachineConfig, name: str) -> LibvirtMachine: ...

    def restore(self, image: BuiltImage, config: MachineConfig, state: SavedState, name: str) -> LibvirtMachine: ...

    def save(self, machine: LibvirtMachine, directory: Path) -> None: ...

    def take_clean(self, machine: LibvirtMachine) -> None: ...

    def revert_clean(self, machine: LibvirtMachine) -> None: ...

    def take_named(self, machine: LibvirtMachine, name: str) -> None: ...

    def revert_named(self, machine: LibvirtMachine, name: str) -> None: ...

    def attach_lan(self, machine: Machine, segment: LanSegment, mac: str) -> None: ...

    def close(self, hosts: list[Host]) -> None:
        """Free what the mode keeps on ``hosts`` besides guests (after they are stopped)."""
        ...
