"""``--vm-report-changes``: what a failed test changed in its guests, as a section of its report.

Read before the guest is reverted (reports are made before fixtures are torn down), so the section shows
what the test left behind without a rerun. It goes into the report's sections (the terminal and any plugin
that shows sections) and into the item's properties (JUnit XML, whatever ``junit_logging`` says).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .errors import VMError
from .guest import VM, GuestState

SECTION = "vm changes"


def changes_text(vm: VM) -> str:
    """vm.changes() as report text, or why there is none."""
    if vm.state == GuestState.DEAD or not vm.machine_alive():
        return "(the guest died; nothing to compare)"
    try:
        return str(vm.changes())
    except VMError as exc:
        return f"(could not tell: {str(exc).splitlines()[0]})"


def add_changes_sections(report: Any, item: Any, guests: Sequence[VM]) -> None:
    """One "vm changes" section per guest the failed test holds (named after the guest when there are several)."""
    for vm in guests:
        title = SECTION if len(guests) == 1 else f"{SECTION}: {vm.name}"
        text = changes_text(vm)
        report.sections.append((title, text))
        item.user_properties.append((title, text))
