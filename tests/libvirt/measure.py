"""Revert and restore timings, libvirt backend next to the QEMU backend, on the same image and config.

Run:  .venv/bin/python tests/libvirt/measure.py [--n 8] [--uri URI ...]

revert            a dirtied guest -> vm.reset() (swap in the spare, which is ready) -> first vm.run returns
restore_to_first  a new instance restored from the saved state -> its first command (the agent) returns
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

from pytest_vmfixtures import pool as pool_module
from pytest_vmfixtures.accel import choose_accel, probe_host
from pytest_vmfixtures.backends.base import Backend, MachineConfig
from pytest_vmfixtures.backends.libvirt import LibvirtBackend
from pytest_vmfixtures.backends.qemu import QemuBackend
from pytest_vmfixtures.cache import Cache, default_cache_dir
from pytest_vmfixtures.catalog import BUILTIN_IMAGES_DIR
from pytest_vmfixtures.pool import Pool
from pytest_vmfixtures.runtime import Runtime

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import bind_channels_any  # noqa: E402


def p50(values: list[float]) -> str:
    return f"p50 {statistics.median(values):.2f} s (min {min(values):.2f}, max {max(values):.2f}, n {len(values)})"


def measure(name: str, backend: Backend, cache: Cache, runtime: Runtime, accel: str, n: int) -> None:
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
        vm = pool.acquire(config)
        reverts = []
        for _ in range(n):
            vm.run("rm -rf /etc/apt /usr/share/doc", timeout=60)
            spare = slot._spare
            if spare is not None:
                spare.result(300)  # a real test runs for a while: the spare is ready when it ends
            time.sleep(0.5)
            started = time.monotonic()
            vm.reset()
            result = vm.run("test -d /etc/apt")
            reverts.append(time.monotonic() - started)
            assert result.ok
        pool.release(vm)
        print(f"{name}: revert {p50(reverts)}")
        print(f"{name}: restore_to_first_command {p50(restores)}")
    finally:
        pool.close()


def main() -> None:
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--uri", action="append", default=[])
    parser.add_argument("--only", choices=["libvirt", "qemu"])
    args = parser.parse_args()
    accel = choose_accel("auto", probe_host())
    cache = Cache(default_cache_dir())
    pool_module.bind_channels = bind_channels_any  # type: ignore[assignment]  # until guest.py has the patch
    if args.only != "qemu":
        runtime = Runtime(cache.root, "measure")
        try:
            measure("libvirt", LibvirtBackend(runtime, accel, args.uri or None), cache, runtime, accel.accel, args.n)
        finally:
            runtime.close()
    if args.only != "libvirt":
        runtime = Runtime(cache.root, "measure")
        try:
            measure("qemu", QemuBackend(runtime, accel), cache, runtime, accel.accel, args.n)
        finally:
            runtime.close()


if __name__ == "__main__":
    main()
