"""Build, cold boot, warm start and revert per guest architecture, side by side.

Run:  scripts/benchmark arches            (or: .venv/bin/python benchmarks/arches.py --help)

Prints a table and writes benchmarks/arches.json (per image: its architecture and accelerator, the build
time when this run built it, and p50/p95 of each scenario). Scenarios:
  build        recipe to cached image (only when the image was not cached; foreign images include the
               second stage under emulation)
  cold_boot    fresh overlay + boot to the first vm.run
  warm_start   a new QEMU restored from the saved ready state -> first vm.run
  revert       a wrecked guest -> vm.revert() -> first vm.run (a standby spare restored in the background,
               as between tests)
Goal (issue "Guests of other CPU architectures"): arm64 revert p50 under 1 s under TCG.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from pytest_vmfixtures.accel import choose_accel, probe_host
from pytest_vmfixtures.arch import by_name
from pytest_vmfixtures.backends.base import MachineConfig
from pytest_vmfixtures.backends.qemu import QemuBackend
from pytest_vmfixtures.images.cache import Cache, default_cache_dir, ensure_image, image_key
from pytest_vmfixtures.images.catalog import BUILTIN_IMAGES_DIR, load_recipe
from pytest_vmfixtures.pool import Pool
from pytest_vmfixtures.runtime import Runtime

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import cold_boots, warm_starts  # noqa: E402
from stats import summary  # noqa: E402

HERE = Path(__file__).resolve().parent
GOAL_REVERT_S = {"aarch64": 1.0}


def image_is_cached(cache: Cache, name: str) -> bool:
    recipe = load_recipe(name, [BUILTIN_IMAGES_DIR])
    return (cache.images / image_key(recipe.name, recipe.digest) / "image.json").is_file()


def reverts(pool: Pool, config: MachineConfig, n: int) -> list[float]:
    vm = pool.acquire(config)
    samples = []
    try:
        for _ in range(n):
            vm.run("rm -rf /etc/ssh /var/lib/dpkg; echo dirty > /root/dirty", timeout=120)
            started = time.monotonic()
            vm.revert()
            vm.run("true", check=True, timeout=120)
            samples.append(time.monotonic() - started)
            assert not vm.run("test -e /root/dirty", timeout=120).ok
    finally:
        pool.release(vm)
    return samples


def measure(image: str, args: argparse.Namespace, accel_name: str) -> dict[str, Any]:
    accel = choose_accel(accel_name, probe_host())
    cache = Cache(args.cache)
    cache.ensure_writable()
    row: dict[str, Any] = {"arch": by_name(load_recipe(image, [BUILTIN_IMAGES_DIR]).architecture).uname}
    if not image_is_cached(cache, image):
        started = time.monotonic()
        ensure_image(cache, image, [BUILTIN_IMAGES_DIR], lambda m: print(f"  {m}", flush=True))
        row["build"] = summary([time.monotonic() - started])
    runtime = Runtime(args.cache, f"bench-{image}")
    pool = Pool(QemuBackend(runtime, accel), cache, runtime, [BUILTIN_IMAGES_DIR], accel=accel.accel,
                standby=1, progress=lambda m: print(f"  {m}", flush=True))
    config = MachineConfig(image, memory_mb=args.memory_mb)
    try:
        built = pool.image(image)
        row["accel"] = pool.accel_for(built)
        pool._slot(config)  # the saved ready state exists before anything is timed
        print(f"{image}: cold boots ...", flush=True)
        row["cold_boot"] = summary(cold_boots(pool, config, args.cold)[0])
        print(f"{image}: warm starts ...", flush=True)
        row["warm_start"] = summary(warm_starts(pool, config, args.warm))
        print(f"{image}: reverts ...", flush=True)
        row["revert"] = summary(reverts(pool, config, args.reverts))
    finally:
        pool.close()
        runtime.close()
    goal = GOAL_REVERT_S.get(row["arch"])
    if goal is not None:
        value = float(row["revert"]["p50"])
        row["goal"] = {"revert p50 (s)": value, "goal": f"< {goal:g}", "met": value < goal}
    return row


def main() -> None:
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)  # refused logins while a guest boots are expected
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", action="append", help="repeatable; default: debian-12, debian-12-arm64, debian-13-riscv64")
    parser.add_argument("--memory-mb", type=int, default=512)
    parser.add_argument("--accel", default="auto")
    parser.add_argument("--cache", type=Path, default=default_cache_dir())
    parser.add_argument("--cold", type=int, default=1, help="cold boots per image (minutes each under emulation)")
    parser.add_argument("--warm", type=int, default=5)
    parser.add_argument("--reverts", type=int, default=10)
    parser.add_argument("--output", type=Path, default=HERE / "arches.json")
    args = parser.parse_args()
    images = args.image or ["debian-12", "debian-12-arm64", "debian-13-riscv64"]
    rows = {image: measure(image, args, args.accel) for image in images}
    document = {
        "machine": {"cpus": os.cpu_count(), "host": platform.machine(), "memory_mb": args.memory_mb,
                    "date": time.strftime("%Y-%m-%d %H:%M:%S")},
        "images": rows,
    }
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    print_table(document)
    print(f"\nwritten to {args.output}")


def print_table(document: dict[str, Any]) -> None:
    print(f"\n{'image':<20} {'arch':<8} {'accel':<5} {'build':>8} {'cold':>8} {'warm p50':>9} {'warm p95':>9}"
          f" {'revert p50':>11} {'revert p95':>11}")
    for image, row in document["images"].items():
        build = f"{row['build']['p50']:.0f}s" if "build" in row else "cached"
        print(f"{image:<20} {row['arch']:<8} {row.get('accel', '-'):<5} {build:>8} {row['cold_boot']['p50']:>7.1f}s"
              f" {row['warm_start']['p50']:>8.2f}s {row['warm_start']['p95']:>8.2f}s"
              f" {row['revert']['p50']:>10.2f}s {row['revert']['p95']:>10.2f}s")
    for image, row in document["images"].items():
        if "goal" in row:
            goal = row["goal"]
            verdict = "met" if goal["met"] else "MISSED"
            print(f"{image}: revert p50 {goal['revert p50 (s)']:.2f} s, goal {goal['goal']} s: {verdict}")


if __name__ == "__main__":
    main()
