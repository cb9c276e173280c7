"""Free page reporting before a save: the saved state of a cloud guest holds only the memory it uses.

Firmware-booted guests get a virtio balloon with free page reporting (reports_free_pages, used by command.build_command_line).
The guest reports free 2 MiB blocks in batches about 2 s apart, and QEMU discards each reported block:
it reads as zero from then on, which the migration stream stores as a flag per page instead of 4 KiB.
The pool drops the guest's caches just before the save, and that freed memory is reported only in the
guest's own time, so the save first waits for the reports to stop coming. Nothing in the guest or QMP
says when they have; QEMU's resident set does (discarded pages leave it), so the wait ends once it has
not shrunk for a few seconds.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from ...errors import WaitTimeout
from ...images.image import BuiltImage
from ...waiting import wait_for

log = logging.getLogger("pytest_vmfixtures")

QUIET_SECONDS = 3.0  # longer than the guest's 2 s between report batches
DEADLINE_SECONDS = 30.0  # a guest reports all of its free memory within about 30 s (Linux's page_reporting.c)
SHRINK_KIB = 1024  # less than this is noise (QEMU's own allocations), not reports

BALLOON_DEVICE = "virtio-balloon-pci,id=balloon0,free-page-reporting=on"


def reports_free_pages(image: BuiltImage) -> bool:
    """Whether the guest gets a virtio balloon that reports the pages it frees (see command.build_command_line).

    Only firmware-booted guests (your own cloud images): their kernel command line is the vendor's, so
    KERNEL_ARGS' ``init_on_free=1`` cannot zero freed pages there. With free page reporting the guest
    hands freed 2 MiB blocks back and QEMU discards them, so they read as zero and the saved state
    stores them as zero pages, next to nothing. A kernel without virtio_balloon or page reporting
    ignores the device.
    """
    return image.firmware_boot


def resident_kib(pid: int) -> int | None:
    """The process's resident set in KiB, or None when it cannot be read (the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmRSS:\s+(\d+)\s+kB", text, re.M)
    return int(match.group(1)) if match else None


def wait_for_reports(name: str, pid: int, quiet: float = QUIET_SECONDS, timeout: float = DEADLINE_SECONDS) -> float:
    """Wait until QEMU ``pid`` has not shrunk for ``quiet`` seconds; returns the MiB it shrank by.

    Past the deadline the save goes ahead anyway: the state is as correct, only larger.
    """
    first = lowest = resident_kib(pid)
    since = time.monotonic()

    def settled() -> bool | None:
        nonlocal lowest, since
        now = resident_kib(pid)
        if now is None or lowest is None:
            return True  # nothing to watch; the save finds out what happened to the process
        if now < lowest - SHRINK_KIB:
            lowest, since = now, time.monotonic()
        return True if time.monotonic() - since >= quiet else None

    try:
        wait_for(f"{name}: free page reports before the save", settled, timeout, interval=0.25, max_interval=0.25)
    except WaitTimeout as exc:
        log.info("%s; saving with what was reported so far", exc)
    return 0.0 if first is None or lowest is None else (first - lowest) / 1024
