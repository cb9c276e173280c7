"""Slot.spares_wanted: how many clean guests a machine config keeps restoring ahead (--vm-standby)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pytest_vmfixtures.backends.base import MachineConfig
from pytest_vmfixtures.pool import HOT_AFTER, STANDBY_AUTO, Slot


def slot(standby: int, taken: int) -> Slot:
    made = Slot(SimpleNamespace(standby=standby), None, MachineConfig("debian-12"), None)  # type: ignore[arg-type]
    made._taken = taken
    return made


@pytest.mark.parametrize(("standby", "taken", "wanted"), [
    (STANDBY_AUTO, 0, 1),
    (STANDBY_AUTO, HOT_AFTER - 1, 1),
    (STANDBY_AUTO, HOT_AFTER, 2),  # a config taken often: short tests would outpace one spare
    (0, 10, 0),
    (1, 10, 1),
    (3, 0, 3),
])
def test_spares_wanted(standby: int, taken: int, wanted: int) -> None:
    assert slot(standby, taken).spares_wanted() == wanted


def test_a_slot_without_saved_state_keeps_no_spares() -> None:
    """Snapshot mode: each guest is reverted in place, nothing is restored ahead."""
    made = slot(STANDBY_AUTO, 5)
    made.refill()
    assert made._spares == []
