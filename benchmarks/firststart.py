"""The warm start as a user sees it, the clock after a restore, and the third round's goals.

  warm_start_seen        a new pytest process, the state cached, one `vm` test: the setup pytest reports
                         for it (what `--durations` shows), p50 of several runs
  warm_start_seen_first  the same setup plus the test's first vm.run (what the first guest command waits)
  clock_after_restore    |guest clock - host clock| after a restore's warm-up (ms), read with the guest
                         agent's guest-get-time (no process in the guest), the reading's own uncertainty added

The `warm_start` beside them times a restore and the first command inside one process; this one adds what a
new process pays for its first guest: the cache's checks, the pool, the backend, the channels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from pytest_vmfixtures.backends.base import MachineConfig
from pytest_vmfixtures.clock import guest_clock_offset
from pytest_vmfixtures.pool import Pool

Summary = Callable[..., dict[str, object]]

SUITE = '''
import json, os, time
import pytest

@pytest.mark.vm(memory_mb={memory_mb})
def test_first(vm):
    start = time.monotonic()
    vm.run("true", check=True)
    with open(os.environ["VMFIX_BENCH_LOG"], "a") as f:
        f.write(json.dumps({{"first_run": time.monotonic() - start}}) + "\\n")
'''

# The setup as pytest reports it: a hook around the test's setup phase, in the inner run.
CONFTEST = '''
import json, os, time
import pytest

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    start = time.monotonic()
    yield
    with open(os.environ["VMFIX_BENCH_LOG"], "a") as f:
        f.write(json.dumps({"setup": time.monotonic() - start}) + "\\n")
'''


def seen(cache: Path, accel: str, image: str, memory_mb: int, runs: int, extra: tuple[str, ...] = ()) -> tuple[list[float], list[float]]:
    """``runs`` new pytest processes of one test on ``image``: each one's setup, and setup plus first vm.run."""
    setups: list[float] = []
    firsts: list[float] = []
    with tempfile.TemporaryDirectory(prefix="vmfx-bench-") as tmp:
        (Path(tmp) / "test_first.py").write_text(SUITE.format(memory_mb=memory_mb))
        (Path(tmp) / "conftest.py").write_text(CONFTEST)
        log = Path(tmp) / "log.jsonl"
        for _ in range(runs):
            log.unlink(missing_ok=True)
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--vm-cache={cache}",
                 f"--vm-accel={accel}", f"--vm-image={image}", *extra, "test_first.py"],
                cwd=tmp, env=dict(os.environ, VMFIX_BENCH_LOG=str(log)), capture_output=True, text=True, timeout=1800,
            )
            if proc.returncode != 0:
                raise SystemExit(f"the one-test run on {image} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
            rows = [json.loads(line) for line in log.read_text().splitlines()]
            setup = next(r["setup"] for r in rows if "setup" in r)
            setups.append(setup)
            firsts.append(setup + next(r["first_run"] for r in rows if "first_run" in r))
    return setups, firsts


def clock_offsets(pool: Pool, config: MachineConfig, n: int) -> list[float]:
    """|guest - host clock| + the reading's uncertainty (ms) after each of ``n`` restores, through the agent."""
    slot = pool._slot(config)
    samples = []
    for _ in range(n):
        instance = slot.new_instance()
        try:
            if instance.agent is None:
                return []  # no agent: no fork-free reading of the guest's clock
            reading = guest_clock_offset(instance.agent)
            if reading is not None:
                samples.append((abs(reading[0]) + reading[1]) * 1000)
        finally:
            instance.close()
    return samples


def measure(pool: Pool, cache: Path, config: MachineConfig, runs: int, summary: Summary) -> dict[str, dict[str, object]]:
    pool.progress(f"measuring the warm start as seen: {runs} new pytest processes of one test ...")
    setups, firsts = seen(cache, pool.accel, config.image, config.memory_mb, runs)
    results = {"warm_start_seen": summary(setups), "warm_start_seen_first": summary(firsts)}
    pool.progress("measuring the clock after restores ...")
    offsets = clock_offsets(pool, config, max(runs, 5))
    if offsets:
        results["clock_after_restore"] = summary(offsets, "ms") | {"max": max(offsets)}
    return results


def targets(results: dict[str, dict[str, object]], cloud_memory_mb: int) -> list[tuple[str, float | None, str, float]]:
    """Round three's goals (besides the revert's, which bench.py keeps): the warm start as seen, the clock,
    and a cloud image without an agent against the built-in guest (rows of cloud.py's scenarios)."""

    def value(name: str, key: str = "p50") -> float | None:
        row = results.get(name)
        return None if row is None else float(row[key])  # type: ignore[arg-type]

    cloud_warm = value(f"warm_start_{cloud_memory_mb}_cloud")
    builtin_warm = value(f"warm_start_{cloud_memory_mb}_builtin")
    return [
        ("warm start as seen p50 (s)", value("warm_start_seen"), "<=", 0.3),
        ("clock after restore, max (ms)", value("clock_after_restore", "max"), "<=", 50),
        ("cloud, no agent: revert p50 (s)", value(f"revert_{cloud_memory_mb}_cloud"), "<=", 0.15),
        ("cloud, no agent / built-in warm start (x)",
         None if cloud_warm is None or not builtin_warm else cloud_warm / builtin_warm, "<=", 1.5),
    ]
