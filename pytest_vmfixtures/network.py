"""Private networks between guests: ``vm_network.add("server")`` and ``server.ip``.

Each network is its own L2 segment (see backends.base.LanSegment). A guest
joins by getting a hot-plugged second NIC, so the saved ready states stay the
same and spares stay usable; the NIC goes away with the instance when the
guest is reverted. Addresses are static and every member's /etc/hosts names
the others, so ``client.run("curl http://server/")`` works.
"""

from __future__ import annotations

import hashlib
import random
import re
import shlex
from collections.abc import Callable

from .backends.base import Backend, LanSegment
from .errors import GuestError
from .guest import VM
from .waiting import wait_for

NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")


def new_segment(rng: random.Random | None = None) -> LanSegment:
    rng = rng or random.SystemRandom()
    return LanSegment(f"239.{rng.randrange(1, 255)}.{rng.randrange(0, 255)}.{rng.randrange(1, 255)}", rng.randrange(20000, 60000))


def mac_on(segment: LanSegment, name: str) -> str:
    digest = hashlib.sha256(f"{segment.endpoint}/{name}".encode()).digest()
    return "52:54:01:" + ":".join(f"{b:02x}" for b in digest[:3])


class Network:
    """One private segment and the guests on it, for one test."""

    def __init__(self, backend: Backend, acquire: Callable[..., VM], subnet: int = 0) -> None:
        self.segment = new_segment()
        self.prefix = f"10.199.{subnet}"
        self._backend = backend
        self._acquire = acquire
        self.members: dict[str, VM] = {}

    def add(self, name: str, image: str | None = None, memory_mb: int | None = None, cpus: int | None = None) -> VM:
        """A new guest (from the pool) on this network, as ``name``; its address is ``vm.ip``."""
        vm = self._acquire(image=image, memory_mb=memory_mb, cpus=cpus)
        self.attach(vm, name)
        return vm

    def attach(self, vm: VM, name: str) -> VM:
        """Put a guest the test already holds (the ``vm`` fixture's, say) on this network."""
        if not NAME.match(name):
            raise ValueError(f"network name {name!r}: use lower-case letters, digits and dashes")
        if name in self.members:
            raise ValueError(f"{name!r} is already on this network")
        if len(self.members) >= 250:
            raise ValueError("a network holds at most 250 guests")
        ip = f"{self.prefix}.{len(self.members) + 2}"
        mac = mac_on(self.segment, name)
        self._backend.attach_lan(vm.machine, self.segment, mac)
        # udev may rename a new NIC right after it appears: let it settle before naming the device.
        find = (
            "udevadm settle -t 10 2>/dev/null; "
            f"for d in /sys/class/net/*; do [ \"$(cat $d/address)\" = {mac} ] && echo ${{d##*/}}; done; true"
        )

        def nic() -> str | None:
            return vm.run(find, timeout=30).stdout.strip() or None

        device = wait_for(f"{vm.name}: the hot-plugged NIC", nic, 60.0, interval=0.1,
                          error=lambda m: GuestError(f"{m}; does the guest kernel support PCI hotplug?"))
        vm.run(f"udevadm settle -t 10 2>/dev/null; ip link set dev {device} up && ip addr add {ip}/24 dev {device}"
               f" && hostname {name}", check=True, timeout=30)
        vm.network_ip = ip
        vm.network_name = name
        self.members[name] = vm
        self._write_hosts()
        return vm

    def _write_hosts(self) -> None:
        entries = "".join(f"{member.network_ip} {name}\n" for name, member in self.members.items())
        script = (
            "sed -i '/# vm_network$/d' /etc/hosts 2>/dev/null; "
            f"printf %s {shlex.quote(''.join(line.rstrip() + ' # vm_network' + chr(10) for line in entries.splitlines()))} >> /etc/hosts"
        )
        for member in self.members.values():
            member.run(script, check=True, timeout=30)
