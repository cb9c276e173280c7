"""libvirt keeps its QEMU capability cache across guest starts (the one-minute-per-guest defect).

When libvirt's QEMU user cannot open /dev/kvm although root can, libvirtd declares the cache invalid
on every domain start and probes QEMU again, rewriting the cache file each time. This starts two
guests and checks the file stayed as it was between them; it times nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from rig import missing as rig_missing

from pytest_vmfixtures.backends.base import MachineConfig
from pytest_vmfixtures.pool import Pool
from pytest_vmfixtures.runtime import Runtime

CAPABILITIES = Path("/var/cache/libvirt/qemu/capabilities")


def cache_files() -> dict[str, tuple[int, int]]:
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in CAPABILITIES.glob("*.xml")}


def test_capability_cache_is_not_rewritten_between_two_guest_starts(
        pool_factory: Callable[..., tuple[Pool, Runtime]], primary_uri: str) -> None:
    if os.geteuid() != 0 or primary_uri != "qemu:///system":
        rig_missing("reads the system libvirtd's capability cache: run as root against qemu:///system")
    if not Path("/dev/kvm").exists():  # the re-probe this guards against comes from libvirt's QEMU user and /dev/kvm
        pytest.skip("no /dev/kvm on this host: libvirt has no reason to re-probe, so this test would prove nothing")
    pool, runtime = pool_factory([primary_uri], standby=0)
    try:
        slot = pool._slot(MachineConfig("debian-12"))
        first = slot.new_instance()
        first.close()
        after_first = cache_files()
        assert after_first, f"no capability cache in {CAPABILITIES} after a guest start"
        second = slot.new_instance()
        second.close()
        assert cache_files() == after_first, (
            "libvirtd rewrote its QEMU capability cache for the second guest: run pytest-vmfixtures doctor")
    finally:
        pool.close()
        runtime.close()
