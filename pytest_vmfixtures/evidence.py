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
from pathlib import Path

from .errors import VMError
from .guest import VM

log = logging.getLogger("pytest_vmfixtures")

# Without journald (sysvinit, busybox) journalctl fails and the kernel log stands in.
JOURNAL = "{ journalctl -b --no-pager -o short-monotonic 2>/dev/null || dmesg 2>/dev/null; } | tail -n 3000"


def artifact_dir(root: Path, nodeid: str, vm_name: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("_")[:150]
    return root / safe / vm_name


def collect(vm: VM, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    saved: list[Path] = []
    console = vm.console_log
    if console.exists():
        target = directory / "console.log"
        shutil.copyfile(console, target)
        saved.append(target)
    if vm.machine_alive():
        screen = directory / "screen.png"
        try:
            vm.screendump(screen)
            saved.append(screen)
        except (VMError, OSError) as exc:
            log.info("%s: no screendump: %s", vm.name, exc)
        try:
            result = vm.run(JOURNAL, timeout=30)
            target = directory / "journal.txt"
            target.write_text(result.stdout)
            saved.append(target)
        except VMError as exc:
            log.info("%s: no journal: %s", vm.name, exc)
    return saved
