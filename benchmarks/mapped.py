"""Mapped RAM states beside stream states, and many guests of one state on one host (speed, round two).

Scenarios it adds to results.json (bench.py runs it; every first-round scenario stays):
  warm_start_stream     warm start from a stream state (the guest's RAM read from the state), beside
                        warm_start, which is now from a mapped state (the RAM file mapped copy-on-write)
  revert_stream         revert in the destructive suite run with --vm-ram-state=stream
  many_ready_<ram>      N guests of one state restored at once -> every one answered a command (s)
  many_memory_<ram>     host memory of those N guests (sum of their QEMU processes' proportional set
                        size, MiB: shared pages of the mapped file are counted once across the N),
                        with one guest's alone for the ratio
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pytest_vmfixtures.backends.base import MachineConfig
from pytest_vmfixtures.backends.qemu import QemuBackend
from pytest_vmfixtures.images.catalog import BUILTIN_IMAGES_DIR
from pytest_vmfixtures.instance import Instance
from pytest_vmfixtures.pool import Pool

Summary = Callable[..., dict[str, object]]


def pss_mib(pid: int) -> float:
    """The process's proportional set size: its private pages, plus its share of pages it shares."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no Pss in /proc/{pid}/smaps_rollup")


def pid_of(instance: Instance) -> int:
    pid: int = instance.machine.process.pid  # type: ignore[attr-defined]  # a QEMU backend's machine
    return pid


def pool_for(template: Pool, ram_state: str) -> Pool:
    """A pool like ``template`` (same cache, runtime, accel) whose states keep RAM the ``ram_state`` way."""
    backend = template.backend
    assert isinstance(backend, QemuBackend)
    other = QemuBackend(backend.runtime, backend.accel, ram_state=ram_state)
    return Pool(other, template.cache, template.runtime, [BUILTIN_IMAGES_DIR], accel=template.accel, standby=0,
                progress=template.progress)


def many(pool: Pool, config: MachineConfig, count: int, first_run: Callable[[Instance], None]) -> tuple[float, float, float]:
    """Seconds until ``count`` guests restored at once have all answered, their memory (MiB), one guest's alone."""
    slot = pool._slot(config)
    alone = slot.new_instance()
    try:
        first_run(alone)
        time.sleep(1.0)  # the guest settles (its timers, the agent's reply) before it is measured
        one = pss_mib(pid_of(alone))
    finally:
        alone.close()

    def ready() -> Instance:
        instance = slot.new_instance()
        first_run(instance)
        return instance

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=count) as workers:
        futures = [workers.submit(ready) for _ in range(count)]
        instances = [f.result() for f in futures]
    elapsed = time.monotonic() - started
    try:
        time.sleep(1.0)
        total = sum(pss_mib(pid_of(i)) for i in instances)
    finally:
        for instance in instances:
            instance.close()
    return elapsed, total, one


def measure(
    pool: Pool, config: MachineConfig, warm: int, guests: int, warm_starts: Callable[[Pool, MachineConfig, int], list[float]],
    first_run: Callable[[Instance], None], summary: Summary,
) -> dict[str, dict[str, object]]:
    """warm_start_stream, and many_* for both ways; ``pool`` is the default (mapped) one."""
    results: dict[str, dict[str, object]] = {}
    stream = pool_for(pool, "stream")
    try:
        print("measuring warm starts from a stream state ...", flush=True)
        results["warm_start_stream"] = summary(warm_starts(stream, config, warm))
        for name, which in (("mapped", pool), ("stream", stream)):
            print(f"measuring {guests} guests at once, {name} RAM ...", flush=True)
            elapsed, total, one = many(which, config, guests, first_run)
            results[f"many_ready_{name}"] = summary([elapsed]) | {"guests": guests}
            results[f"many_memory_{name}"] = summary([total], "MiB") | {"guests": guests, "one_guest_mib": round(one, 1),
                                                                         "ratio": round(total / one, 2)}
    finally:
        stream.close()
    return results


def targets(results: dict[str, dict[str, object]], guests: int) -> list[tuple[str, float | None, str, float]]:
    """Round two's goals that these scenarios measure."""
    memory = results.get("many_memory_mapped")
    ratio = float(memory["ratio"]) if memory else None  # type: ignore[arg-type]
    return [(f"{guests} guests' memory / one guest's (x)", ratio, "<=", 3.0)]


def describe(results: dict[str, Any]) -> list[str]:
    lines = []
    for name in ("mapped", "stream"):
        memory = results.get(f"many_memory_{name}")
        ready = results.get(f"many_ready_{name}")
        if memory and ready:
            lines.append(f"{memory['guests']} guests, {name} RAM: ready in {ready['p50']:.2f} s, "
                         f"{memory['p50']:.0f} MiB ({memory['ratio']:.1f}x one guest's {memory['one_guest_mib']:.0f} MiB)")
    return lines
