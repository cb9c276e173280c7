"""What a failed test leaves for a person to look at.

Collected before the guest is reverted, while it still shows the failure:
the full console log, a screendump from QMP, and the guest's journal (or
dmesg) when the guest still answers. Each piece is best effort: a dead guest
still yields its console log.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .errors import VMError
from .guest import VM

log = logging.getLogger("pytest_vmfixtures")

# Without journald (sysvinit, busybox) journalctl fails and the kernel log stands in.
JOURNAL = "{ journalctl -b --no-pager -o short-monotonic 2>/dev/null || dmesg 2>/dev/null; } | tail -n 3000"


def artifact_dir(root: Path, nodeid: str, vm_name: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("_")[:150]
    return root / safe / vm_name


@dataclass
class Evidence:
    """What was saved from one guest of a failed test, and why any piece is missing."""

    guest: str
    image: str
    accel: str
    files: dict[str, Path] = field(default_factory=dict)  # "console", "screen", "journal" -> absolute path
    skipped: dict[str, str] = field(default_factory=dict)  # the same keys -> why there is none

    def paths(self) -> list[Path]:
        return list(self.files.values())


def collect(vm: VM, directory: Path) -> Evidence:
    """Save the console log, a screendump and the journal of ``vm`` under ``directory`` (made absolute)."""
    directory = directory.absolute()
    directory.mkdir(parents=True, exist_ok=True)
    evidence = Evidence(vm.name, vm.image, vm.accel)
    console = vm.console_log
    if console.exists():
        target = directory / "console.log"
        shutil.copyfile(console, target)
        evidence.files["console"] = target
    else:
        evidence.skipped["console"] = f"no console log at {console}"
    if not vm.machine_alive():
        for piece in ("screen", "journal"):
            evidence.skipped[piece] = "the guest was no longer running"
        return evidence
    screen = directory / "screen.png"
    try:
        vm.screendump(screen)
        evidence.files["screen"] = screen
    except (VMError, OSError) as exc:
        log.info("%s: no screendump: %s", vm.name, exc)
        evidence.skipped["screen"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    try:
        result = vm.run(JOURNAL, timeout=30)
        target = directory / "journal.txt"
        target.write_text(result.stdout)
        evidence.files["journal"] = target
    except VMError as exc:
        log.info("%s: no journal: %s", vm.name, exc)
        evidence.skipped["journal"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return evidence
