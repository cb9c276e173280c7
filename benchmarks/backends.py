"""Revert and restore timings of the backends side by side, on the same image and config.

Run:  .venv/bin/python benchmarks/backends.py [--n 8] [--uri URI ...] [--snapshot-network NAME] [--no-qemu]

Measures the QEMU backend, then the libvirt backend once per --uri (default qemu:///system), each
URI on its own: a remote-mode URI (see docs/libvirt.md) shows what uploads and libvirt's own restore
cost. Prints a table and writes benchmarks/backends.json.

revert            a dirtied guest -> vm.reset() (swap in the spare, which is ready) -> first vm.run returns
restore_to_first  a new instance restored from the saved state -> its first command (the agent) returns

--snapshot-network NAME also measures the libvirt backend's snapshot mode on qemu:///system, its
guests on that libvirt network: revert is then libvirt's revertToSnapshot of the guest's own domain
(nothing prepared in the background) -> first vm.run returns; first_boot is a guest's boot,
provisioning and snapshot, which every guest of that mode pays once.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from pytest_vmfixtures.accel import choose_accel, probe_host
from pytest_vmfixtures.backends.base import Backend, MachineConfig
from pytest_vmfixtures.backends.libvirt import LibvirtBackend
from pytest_vmfixtures.backends.qemu import QemuBackend
from pytest_vmfixtures.guest import VM
from pytest_vmfixtures.images.cache import Cache, default_cache_dir
from pytest_vmfixtures.images.catalog import BUILTIN_IMAGES_DIR
from pytest_vmfixtures.pool import Pool
from pytest_vmfixtures.runtime import Runtime

HERE = Path(__file__).resolve().parent


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def measure(backend: Backend, cache: Cache, runtime: Runtime, accel: str, n: int) -> dict[str, dict[str, float]]:
    config = MachineConfig("debian-12")
    pool = Pool(backend, cache, runtime, [BUILTIN_IMAGES_DIR], accel=accel, standby=1,
                progress=lambda m: print(f"  {m}", flush=True))
    try:
        slot = pool._slot(config)
        restores = []
        for _ in range(n):
            started = time.monotonic()
            instance = slot.new_instance()  # restore, bind, agent sync + first command (the clock fix)
            restores.append(time.monotonic() - started)
            instance.close()
        # a real test runs for a while: the spare is ready when it ends
        return {"revert": summary(timed_reverts(pool, pool.acquire(config), n, slot.wait_for_spares)),
                "restore_to_first_command": summary(restores)}
    finally:
        pool.close()


def timed_reverts(pool: Pool, vm: VM, n: int, between: Callable[[], None] = lambda: None) -> list[float]:
    """``n`` reverts of ``vm`` after a destructive command, each to the first command that finds it clean."""
    reverts = []
    for _ in range(n):
        vm.run("rm -rf /etc/apt /usr/share/doc", timeout=60)
        between()
        time.sleep(0.5)
        started = time.monotonic()
        vm.reset()
        result = vm.run("test -d /etc/apt")
        reverts.append(time.monotonic() - started)
        assert result.ok
    pool.release(vm)
    return reverts


def measure_snapshot_mode(backend: Backend, cache: Cache, runtime: Runtime, accel: str,
                          n: int) -> dict[str, dict[str, float]]:
    config = MachineConfig("debian-12")
    pool = Pool(backend, cache, runtime, [BUILTIN_IMAGES_DIR], accel=accel, standby=1,
                progress=lambda m: print(f"  {m}", flush=True))
    try:
        started = time.monotonic()
        vm = pool.acquire(config)  # its first boot, provisioning and clean snapshot
        first_boot = time.monotonic() - started
        return {"revert": summary(timed_reverts(pool, vm, n)), "first_boot": summary([first_boot])}
    finally:
        pool.close()


def main() -> None:
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--uri", action="append", default=[], help="a libvirt URI to measure (repeatable)")
    parser.add_argument("--snapshot-network", default=None, metavar="NAME",
                        help="also measure libvirt's snapshot mode on qemu:///system, guests on this libvirt network")
    parser.add_argument("--no-qemu", action="store_true", help="leave out the QEMU backend")
    parser.add_argument("--output", type=Path, default=HERE / "backends.json")
    args = parser.parse_args()
    accel = choose_accel("auto", probe_host())
    cache = Cache(default_cache_dir())
    results: dict[str, dict[str, dict[str, float]]] = {}
    backends: list[tuple[str, object]] = [] if args.no_qemu else [("qemu", None)]
    backends += [(f"libvirt {uri}", uri) for uri in args.uri or ["qemu:///system"]]
    for label, uri in backends:
        print(f"measuring {label} ...", flush=True)
        runtime = Runtime(cache.root, "measure")
        try:
            backend: Backend = QemuBackend(runtime, accel) if uri is None else LibvirtBackend(runtime, accel, [str(uri)])
            results[label] = measure(backend, cache, runtime, accel.accel, args.n)
        finally:
            runtime.close()
    if args.snapshot_network:
        label = "libvirt qemu:///system, snapshot mode"
        print(f"measuring {label} ...", flush=True)
        runtime = Runtime(cache.root, "measure")
        try:
            backend = LibvirtBackend(runtime, accel, ["qemu:///system"], mode="snapshot", network=args.snapshot_network)
            results[label] = measure_snapshot_mode(backend, cache, runtime, accel.accel, args.n)
        finally:
            runtime.close()
    print(f"\n{'backend':<60} {'revert p50':>11} {'restore p50':>12}")
    for label, row in results.items():
        other = row.get("restore_to_first_command") or row["first_boot"]
        kind = "" if "restore_to_first_command" in row else " (first boot)"
        print(f"{label:<60} {row['revert']['p50']:>10.2f}s {other['p50']:>11.2f}s{kind}")
    args.output.write_text(json.dumps({"accel": accel.accel, "results": results}, indent=2) + "\n")
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
