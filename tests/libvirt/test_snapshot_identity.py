"""Snapshot mode: SSH reaches the guest it was meant for, or fails with a clear error (review finding M3).

Guests of one image share their host key and accept the same client key, and in snapshot mode they
sit on one libvirt network: the key alone cannot tell them apart. Here guest B takes guest A's address
(A loses it, B adds it and announces it): SSH to A must refuse B, not run A's commands there. After
the revert both are themselves again and SSH to A reaches A. On the vmfx-nat rig, with ``tiny``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator

import pytest
from guests import machine_of, pool_on_network, ssh_output  # noqa: E402
from rig import import_libvirt  # noqa: E402

libvirt = import_libvirt()

from pytest_vmfixtures.backends.base import MachineConfig  # noqa: E402
from pytest_vmfixtures.errors import GuestError  # noqa: E402
from pytest_vmfixtures.pool import Pool  # noqa: E402
from pytest_vmfixtures.runtime import Runtime  # noqa: E402

CONFIG = MachineConfig("tiny")
NIC = "$(ls /sys/class/net | grep -vx lo | head -n 1)"


@pytest.fixture(scope="module")
def ident_pool(pool_factory: Callable[..., tuple[Pool, Runtime]], primary_uri: str,
               nat_network: str) -> Iterator[Pool]:
    for pool, _runtime in pool_on_network(pool_factory, primary_uri, nat_network):
        yield pool


def test_ssh_to_a_guest_whose_address_another_took_is_refused(ident_pool: Pool) -> None:
    a = ident_pool.acquire(CONFIG)
    b = ident_pool.acquire(CONFIG)
    try:
        address = machine_of(a).ssh_host
        assert address != machine_of(b).ssh_host
        a.run("echo a > /root/who", check=True)  # commands go through each domain's own agent channel
        b.run("echo b > /root/who", check=True)
        assert ssh_output(a, "cat /root/who") == "a\n"
        a.run(f"ip addr del {address}/24 dev {NIC}", check=True)
        b.run(f"ip addr add {address}/24 dev {NIC} && arping -U -c 2 -I {NIC} {address} >/dev/null 2>&1; true",
              check=True)
        subprocess.run(["ip", "neigh", "flush", "to", address], check=False, timeout=30)  # the host asks who has it
        a._instance.close_channels()  # a new SSH session, as after a revert or a dropped connection
        with pytest.raises(GuestError, match="reached another machine"):
            ssh_output(a, "cat /root/who")
    finally:
        ident_pool.release(a)
        ident_pool.release(b)
    again = ident_pool.acquire(CONFIG)  # one of the two, reverted: itself again, at its own address
    try:
        assert ssh_output(again, "cat /root/who") == ""  # its NIC checked on connect: the guest it is, reverted
    finally:
        ident_pool.release(again)
