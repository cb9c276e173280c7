"""What vm.changes() costs: the baseline taken when a clean state is made, and a call in a test.

  changes_baseline       seconds the baseline adds to making a clean state (one cold boot per sample)
  changes_first_boot     that boot without the baseline: boot to SSH, provisioning (the 10% budget's base)
  changes_call           vm.changes() after a test changed a few files: the first call on a guest just
                         restored from the saved state (as a test would make it), one per restored guest

Run alone:  .venv/bin/python benchmarks/changes.py [--image debian-12] [--boots 1] [--calls 10]
(prints a table, writes benchmarks/changes.json); bench.py runs it beside the other scenarios.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pytest_vmfixtures.backends.base import MachineConfig
from pytest_vmfixtures.pool import Pool

Summary = Callable[..., dict[str, object]]
HERE = Path(__file__).resolve().parent

# "a test that changed a few files": new, edited, removed, re-permissioned, and touched with the same content
A_FEW_CHANGES = ("echo new > /etc/bench-new; echo x >> /etc/group; rm -f /etc/profile; chmod 600 /etc/shells; "
                 "touch /etc/hostname; mkdir -p /root/bench && echo f > /root/bench/f")


def baseline_costs(pool: Pool, config: MachineConfig, boots: int) -> tuple[list[float], list[float]]:
    """Per cold boot: (the boot and provisioning without the baseline, the baseline)."""
    image = pool.image(config.image, config)
    first_boot, baseline = [], []
    for i in range(boots):
        started = time.monotonic()
        instance, facts = pool._boot_provisioned(image, config, pool.runtime.new_name(f"bench-base-{i}"), started)
        total = time.monotonic() - started
        instance.close()
        seconds = facts.get("changes_baseline_seconds")
        if not isinstance(seconds, float | int):
            raise SystemExit(f"no baseline was taken on {config.image}: {facts}")
        baseline.append(float(seconds))
        first_boot.append(total - float(seconds))
    return first_boot, baseline


def call_costs(pool: Pool, config: MachineConfig, calls: int) -> list[float]:
    """vm.changes() on freshly restored guests after A_FEW_CHANGES; the answer is checked, not just timed."""
    slot = pool._slot(config)
    samples = []
    for _ in range(calls):
        vm = pool._handle(slot.image, config, slot.new_instance(), slot)
        try:
            vm.run(A_FEW_CHANGES, check=True)
            started = time.monotonic()
            changes = vm.changes()
            samples.append(time.monotonic() - started)
            if changes.added != ["/etc/bench-new", "/root/bench", "/root/bench/f"] or changes.removed != ["/etc/profile"]:
                raise SystemExit(f"vm.changes() answered wrongly:\n{changes}")
        finally:
            vm.kill()
    return samples


def measure(pool: Pool, config: MachineConfig, boots: int, calls: int, summary: Summary) -> dict[str, dict[str, object]]:
    print(f"measuring vm.changes(): {boots} cold boot(s) with a baseline, {calls} calls ...", flush=True)
    results = {"changes_call": summary(call_costs(pool, config, calls))}
    if boots:  # --boots 0: only the calls (the state's own first boot printed both figures when it was made)
        first_boot, baseline = baseline_costs(pool, config, boots)
        results["changes_first_boot"] = summary(first_boot)
        results["changes_baseline"] = summary(baseline)
        results["changes_baseline"]["percent_of_first_boot"] = round(100 * sum(baseline) / sum(first_boot), 1)
    return results


def targets(results: dict[str, dict[str, object]]) -> list[tuple[str, float | None, str, float]]:
    base = results.get("changes_baseline")
    call = results.get("changes_call")
    return [
        ("vm.changes() baseline / first boot (%)", None if base is None else float(base["percent_of_first_boot"]), "<=", 10),  # type: ignore[arg-type]
        ("vm.changes() after a few changes p50 (s)", None if call is None else float(call["p50"]), "<=", 1.0),  # type: ignore[arg-type]
    ]


def main() -> None:
    from stats import summary  # the other scenarios' percentiles

    from pytest_vmfixtures.accel import choose_accel, probe_host
    from pytest_vmfixtures.backends.qemu import QemuBackend
    from pytest_vmfixtures.images.cache import Cache, default_cache_dir
    from pytest_vmfixtures.images.catalog import BUILTIN_IMAGES_DIR
    from pytest_vmfixtures.runtime import Runtime

    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default="debian-12")
    parser.add_argument("--cache", type=Path, default=default_cache_dir())
    parser.add_argument("--boots", type=int, default=1)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--boot-timeout", type=float, default=600.0, help="seconds a cold boot may take (a loaded machine: more)")
    parser.add_argument("--output", type=Path, default=HERE / "changes.json")
    args = parser.parse_args()
    accel = choose_accel("auto", probe_host())
    cache = Cache(args.cache)
    runtime = Runtime(args.cache, "bench-changes")
    pool = Pool(QemuBackend(runtime, accel), cache, runtime, [BUILTIN_IMAGES_DIR], accel=accel.accel, standby=0,
                boot_timeout=args.boot_timeout, progress=lambda m: print(f"  {m}", flush=True))
    config = MachineConfig(args.image)
    try:
        results = measure(pool, config, args.boots, args.calls, summary)
    finally:
        pool.close()
        runtime.close()
    print(f"\n{'scenario':<22} {'p50':>8} {'p95':>8} {'n':>4}")
    for name, row in results.items():
        print(f"{name:<22} {row['p50']:>7.2f}s {row['p95']:>7.2f}s {row['n']:>4}")
    for name, value, op, limit in targets(results):
        if value is None:
            print(f"{name:<44} {'-':>7}  goal {op} {limit:g}  not measured")
            continue
        met = value <= limit if op == "<=" else value >= limit
        print(f"{name:<44} {value:>7.2f}  goal {op} {limit:g}  {'met' if met else 'MISSED'}")
    args.output.write_text(json.dumps({"image": args.image, "accel": accel.accel, "scenarios": results}, indent=2) + "\n")
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
