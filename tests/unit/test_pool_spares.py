"""Slot.spares_wanted: how many clean guests a machine config keeps restoring ahead (--vm-standby); and
Slot.shed_if_idle: a slot the run has left stops them (stand-in guests: what is checked is which are stopped)."""

from __future__ import annotations

from concurrent.futures import Future
from types import SimpleNamespace

import pytest

from pytest_vmfixtures.backends.base import MachineConfig
from pytest_vmfixtures.slot import HOT_AFTER, IDLE_AFTER, STANDBY_AUTO, Slot


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


class Guest:
    """A stand-in for a guest (an instance or a VM handle): records whether it was stopped."""

    def __init__(self) -> None:
        self.stopped = False

    def close(self) -> None:
        self.stopped = True

    kill = close


def ready_spare(guest: Guest) -> Future[Guest]:
    spare: Future[Guest] = Future()
    spare.set_result(guest)
    return spare


def idle_slot(standby: int = STANDBY_AUTO) -> tuple[Slot, Guest, Guest, Future[Guest]]:
    made = slot(standby, HOT_AFTER)
    spare, parked = Guest(), Guest()
    restoring: Future[Guest] = Future()  # a spare still being restored
    made._spares = [ready_spare(spare), restoring]  # type: ignore[list-item]
    made.idle = [parked]  # type: ignore[list-item]
    return made, spare, parked, restoring


def test_a_slot_left_for_a_minute_stops_its_ready_spares_and_idle_guests() -> None:
    made, spare, parked, restoring = idle_slot()
    taken = made._last_take
    assert made.shed_if_idle(taken + IDLE_AFTER - 1) == 0  # still in use
    assert not spare.stopped and not parked.stopped
    assert made.shed_if_idle(taken + IDLE_AFTER + 1) == 2
    assert spare.stopped and parked.stopped
    assert made._spares == [restoring] and made.idle == []  # a restore under way is left to a later round
    assert made.spares_wanted() == 1  # cold again: one spare once it is taken from
    later = Guest()
    restoring.set_result(later)
    assert made.shed_if_idle(taken + 2 * IDLE_AFTER) == 1 and later.stopped


def test_a_slot_whose_guest_a_test_holds_keeps_its_spares() -> None:
    made, spare, _parked, _restoring = idle_slot()
    made.hold(Guest())  # type: ignore[arg-type]
    assert made.shed_if_idle(made._last_take + 10 * IDLE_AFTER) == 0 and not spare.stopped


def test_a_slot_taken_from_again_is_not_idle() -> None:
    made, spare, parked, _restoring = idle_slot()
    assert made.pop_idle() is parked  # type: ignore[comparison-overlap]
    assert made.shed_if_idle(made._last_take + IDLE_AFTER - 1) == 0 and not spare.stopped


def test_a_standby_count_given_is_kept_however_long_the_slot_is_idle() -> None:
    made, spare, parked, _restoring = idle_slot(standby=2)
    assert made.shed_if_idle(made._last_take + 10 * IDLE_AFTER) == 0
    assert not spare.stopped and not parked.stopped
