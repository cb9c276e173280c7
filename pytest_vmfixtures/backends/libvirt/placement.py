"""Which libvirt host a guest goes to, and the registry of the guests this run placed there.

Both modes use one placement (saved_state.py's starts, snapshot_mode.py's boots). Its ``lock``
also guards ``Host.machines``, ``Host.copies`` and saved-state mode's private networks.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ...errors import ImageError
from ...images.image import BuiltImage
from .connection import Host, connection_lost, pick_host
from .machine import LibvirtMachine

log = logging.getLogger("pytest_vmfixtures")


def hosts_for(image: BuiltImage, hosts: list[Host]) -> list[Host]:
    """The hosts a guest of ``image`` may run on: any, except that your own cloud image runs only on
    hosts that share this machine's files (its seed and NVRAM are files here; see storage.host_files)."""
    if image.kernel is not None:
        return hosts
    local = [h for h in hosts if h.storage is None]
    if not local:
        raise ImageError(
            f"{image.name} boots through firmware (your own cloud image), which the libvirt backend runs only on "
            f"a host sharing this machine's files (qemu:///system or qemu:///session), not on "
            f"{', '.join(h.uri for h in hosts)}: add such a --vm-libvirt-uri, or use --vm-backend qemu"
        )
    return local


class Placement:
    """The hosts of a run, the guests placed on them, and the lock that guards both."""

    def __init__(self, hosts: list[Host], progress: Callable[[str], None]) -> None:
        self.hosts = hosts  # the backend's list: hosts connected later are seen here too
        self.progress = progress
        self.lock = threading.Lock()
        self._machines: dict[str, LibvirtMachine] = {}

    def pick(self, name: str, image: BuiltImage) -> Host:
        """The host for domain ``name`` (counted there until ``release``)."""
        with self.lock:
            return pick_host(hosts_for(image, self.hosts), name)

    def release(self, host: Host, name: str) -> None:
        with self.lock:
            host.machines.discard(name)

    def register(self, machine: LibvirtMachine) -> None:
        """A started guest, stopped at close() unless kept."""
        with self.lock:
            self._machines[machine.placed_as] = machine

    def forget(self, machine: LibvirtMachine) -> None:
        """A stopped guest (machines call it from stop()): its host and its RAM copy are free again."""
        with self.lock:
            self._machines.pop(machine.placed_as, None)
            if machine.state_copy is not None:
                machine.state_copy.busy = False
        self.release(machine.host, machine.placed_as)

    def keep(self, machine: LibvirtMachine) -> None:
        """Left running at close(); the host still counts it."""
        with self.lock:
            self._machines.pop(machine.placed_as, None)

    def machines(self) -> list[LibvirtMachine]:
        """The guests this run placed and has not stopped or kept."""
        with self.lock:
            return list(self._machines.values())

    def load(self) -> dict[str, int]:
        """Running guests per URI."""
        with self.lock:
            return {h.uri: h.running for h in self.hosts}

    def mark_if_down(self, host: Host, exc: BaseException) -> bool:
        """Whether ``exc`` came from losing ``host``; if so no more guests go there."""
        if not connection_lost(host.conn):
            return False
        with self.lock:
            if not host.down:
                host.down = f"connection lost ({exc})"
                log.warning("libvirt at %s stopped answering; placing guests on the other hosts", host.uri)
                self.progress(f"libvirt at {host.uri} stopped answering; placing guests on the other hosts")
        return True
