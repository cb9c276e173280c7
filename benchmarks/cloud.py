"""A cloud image (your own, booted by its firmware with a cloud-init seed) beside a built-in image.

Both guests get the same memory size, and both are measured in the same run, one after the other: on
a shared machine only the ratio between them means much. Per guest:
  warm_start   a new QEMU restored from the saved ready state -> first vm.run
  revert       end of one destructive test -> the next test's first vm.run (real pytest, standby spare)
  state        size of the saved state's memory file (MiB)
The cloud images are the test suite's stand-ins for vendor images (tests/integration/cloudimage.py: Debian 12
with cloud-init and no init_on_free on its kernel command line), used from their local paths: "cloud" is the
UEFI one without a guest agent (commands over SSH), "cloud_agent" the BIOS one that runs qemu-guest-agent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pytest_vmfixtures.backends.base import MachineConfig, SavedState
from pytest_vmfixtures.pool import Pool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.integration import cloudimage  # noqa: E402

Summary = Callable[..., dict[str, object]]

# Wrecks that leave sshd running: the cloud guest has no guest agent, so SSH is its only channel.
SUITE = '''
import json, os, time
import pytest

LOG = os.environ["VMFIX_BENCH_LOG"]
WRECK = [
    "rm -rf /etc/ssh/ssh_config.d /usr/share/doc /var/lib/dpkg",
    "dd if=/dev/zero of=/root/fill bs=1M count=64 2>/dev/null; sync",
    "rm -rf /usr/lib/x86_64-linux-gnu/perl-base /usr/share/locale",
    "mkdir -p /root/junk && cp -r /usr/share/zoneinfo /root/junk/",
]

@pytest.mark.vm(image={image!r}, memory_mb={memory_mb})
@pytest.mark.parametrize("i", range({count}))
def test_destructive(vm, i):
    start = time.monotonic()
    result = vm.run("test -d /var/lib/dpkg && test -d /usr/share/doc && ! test -e /root/fill && ! test -e /root/junk")
    first = time.monotonic()
    assert result.ok, "guest was not clean"
    vm.run(WRECK[i % len(WRECK)], timeout=120)
    end = time.monotonic()
    with open(LOG, "a") as f:
        f.write(json.dumps({{"i": i, "start": start, "first_run_done": first, "end": end}}) + "\\n")
'''


def image_path(pool: Pool, variant: str = "uefi") -> Path | None:
    """A test cloud image's qcow2 (built on first use), or None when the tools to build it are missing."""
    missing = cloudimage.missing_tools()
    if missing:
        pool.progress(f"cloud image scenario skipped: building it needs {', '.join(missing)}")
        return None
    return cloudimage.ensure(pool.cache, pool.progress, variant)


def reverts(cache: Path, accel: str, standby: int | str, image: str, memory_mb: int, count: int) -> list[float]:
    """Revert times between ``count`` destructive tests on ``image`` in one pytest run."""
    with tempfile.TemporaryDirectory(prefix="vmfx-bench-") as tmp:
        test_file = Path(tmp) / "test_destructive.py"
        test_file.write_text(SUITE.format(image=image, memory_mb=memory_mb, count=count))
        log = Path(tmp) / "log.jsonl"
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--vm-cache={cache}",
             f"--vm-accel={accel}", f"--vm-standby={standby}", str(test_file)],
            cwd=tmp, env=dict(os.environ, VMFIX_BENCH_LOG=str(log)), capture_output=True, text=True, timeout=3600,
        )
        if proc.returncode != 0:
            raise SystemExit(f"the destructive suite on {image} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
        rows = sorted((json.loads(line) for line in log.read_text().splitlines()), key=lambda r: r["i"])
    return [b["first_run_done"] - a["end"] for a, b in zip(rows, rows[1:], strict=False)]


def state_mib(state: SavedState) -> float:
    """The saved guest memory: the stream, and a mapped state's RAM file (its allocated blocks: it is sparse)."""
    ram = state.directory / "ram"
    return (state.memory.stat().st_size + (ram.stat().st_blocks * 512 if ram.exists() else 0)) / 2**20


def measure(
    pool: Pool, cache: Path, builtin: str, memory_mb: int, warm: int, tests: int, standby: int | str,
    warm_starts: Callable[[Pool, MachineConfig, int], list[float]], summary: Summary,
) -> dict[str, dict[str, object]]:
    """The scenarios of each guest, keyed ``<scenario>_<memory>_<builtin|cloud|cloud_agent>``; empty when skipped."""
    disk, agent_disk = image_path(pool), image_path(pool, "bios")
    if disk is None or agent_disk is None:
        return {}
    # "cloud": no guest agent, SSH only (as Ubuntu's and Fedora's images); "cloud_agent": one that runs it.
    guests = {"builtin": MachineConfig(builtin, memory_mb=memory_mb), "cloud": MachineConfig(str(disk), memory_mb=memory_mb),
              "cloud_agent": MachineConfig(str(agent_disk), memory_mb=memory_mb)}
    results: dict[str, dict[str, object]] = {}
    for kind, config in guests.items():
        started = time.monotonic()
        state = pool._slot(config).state  # made here when missing, before anything is timed
        assert state is not None, "the QEMU backend keeps saved states"
        size = state_mib(state)
        pool.progress(f"{kind} guest {config.describe()}: state ready in {time.monotonic() - started:.0f} s, "
                      f"memory file {size:.0f} MiB")
        results[f"state_{memory_mb}_{kind}"] = summary([size], "MiB") | {"guest_ram_mib": memory_mb}
        pool.progress(f"measuring {kind} warm starts ...")
        results[f"warm_start_{memory_mb}_{kind}"] = summary(warm_starts(pool, config, warm))
    for kind, config in guests.items():
        pool.progress(f"running {tests} destructive tests on the {kind} guest in pytest ...")
        results[f"revert_{memory_mb}_{kind}"] = summary(reverts(cache, pool.accel, standby, config.image, memory_mb, tests))
    return results


def targets(results: dict[str, dict[str, object]], memory_mb: int) -> list[tuple[str, float | None, str, float]]:
    """The issue's goals for cloud guests: within 2x of the built-in guest, and revert p50 <= 0.3 s."""

    def p50(name: str) -> float | None:
        row = results.get(name)
        return None if row is None else float(row["p50"])  # type: ignore[arg-type]

    def ratio(scenario: str, kind: str) -> float | None:
        cloud, builtin = p50(f"{scenario}_{memory_mb}_{kind}"), p50(f"{scenario}_{memory_mb}_builtin")
        return None if cloud is None or not builtin else cloud / builtin

    rows: list[tuple[str, float | None, str, float]] = []
    for kind, label in (("cloud", "cloud"), ("cloud_agent", "cloud with agent")):
        rows += [
            (f"{label} / built-in warm start p50 (x)", ratio("warm_start", kind), "<=", 2),
            (f"{label} / built-in revert p50 (x)", ratio("revert", kind), "<=", 2),
            (f"{label} revert p50 (s)", p50(f"revert_{memory_mb}_{kind}"), "<=", 0.3),
        ]
    return rows
