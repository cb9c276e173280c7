"""waiting.wait_for: every wait has a name, a deadline, and a diagnosis when it runs out."""

from __future__ import annotations

import pytest

from pytest_vmfixtures import waiting
from pytest_vmfixtures.errors import BootError, GuestError, WaitTimeout
from pytest_vmfixtures.waiting import Deadline, wait_for


def test_returns_the_first_value_that_is_not_none() -> None:
    answers = iter([None, None, "ready", "later"])
    calls = []

    def attempt() -> str | None:
        calls.append(1)
        return next(answers)

    assert wait_for("step", attempt, 5.0, interval=0.001) == "ready"
    assert len(calls) == 3


@pytest.mark.parametrize("value", [0, False, "", []])
def test_falsy_values_count_as_answers(value: object) -> None:
    assert wait_for("step", lambda: value, 5.0) == value


def test_zero_timeout_still_makes_one_attempt() -> None:
    assert wait_for("step", lambda: 42, 0) == 42
    with pytest.raises(WaitTimeout, match="timed out after 0 s waiting for step"):
        wait_for("step", lambda: None, 0)


class FakeClock:
    """Deterministic time for the polling helper: sleeping advances the clock and is recorded."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(waiting.time, "monotonic", fake.monotonic)
    monkeypatch.setattr(waiting.time, "sleep", fake.sleep)
    return fake


def test_times_out_with_the_step_name_and_the_diagnosis(clock: FakeClock) -> None:
    with pytest.raises(WaitTimeout) as info:
        wait_for("SSH on debian-12-1", lambda: None, 0.2, interval=0.01, diagnose=lambda: "sshd never started")
    assert str(info.value) == "timed out after 0.2 s waiting for SSH on debian-12-1: sshd never started"
    assert sum(clock.sleeps) == pytest.approx(0.2)


def test_raises_the_given_error_type() -> None:
    def fail(message: str) -> BootError:
        return BootError(message, diagnosis="kernel panic: VFS")

    with pytest.raises(BootError) as info:
        wait_for("boot", lambda: None, 0.05, interval=0.01, error=fail, diagnose=lambda: "panicked")
    assert info.value.diagnosis == "kernel panic: VFS"
    assert "timed out after 0.05 s waiting for boot: panicked" in str(info.value)


def test_diagnosis_runs_once_and_only_on_timeout() -> None:
    diagnosed = []

    def diagnose() -> str:
        diagnosed.append(1)
        return "why"

    wait_for("fast", lambda: True, 1.0, diagnose=diagnose)
    assert diagnosed == []
    with pytest.raises(WaitTimeout):
        wait_for("slow", lambda: None, 0.05, interval=0.01, diagnose=diagnose)
    assert diagnosed == [1]


def test_a_failing_diagnosis_does_not_hide_the_timeout() -> None:
    def diagnose() -> str:
        raise OSError("console log gone")

    with pytest.raises(WaitTimeout, match=r"waiting for x: \(diagnosis failed: console log gone\)"):
        wait_for("x", lambda: None, 0.02, interval=0.01, diagnose=diagnose)


def test_empty_diagnosis_leaves_the_message_plain() -> None:
    with pytest.raises(WaitTimeout) as info:
        wait_for("x", lambda: None, 0.02, interval=0.01, diagnose=lambda: "")
    assert str(info.value) == "timed out after 0.02 s waiting for x"


def test_an_attempt_that_raises_aborts_at_once() -> None:
    calls = []

    def attempt() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise GuestError("QEMU exited with status 1")
        return None

    with pytest.raises(GuestError, match="QEMU exited"):
        wait_for("QMP socket", attempt, 30.0, interval=0.001, diagnose=lambda: pytest.fail("no diagnosis on abort"))
    assert len(calls) == 2  # aborted at once, not after the 30 s deadline


def test_interval_backs_off_up_to_the_maximum(clock: FakeClock) -> None:
    with pytest.raises(WaitTimeout):
        wait_for("x", lambda: None, 0.5, interval=0.01, max_interval=0.08)
    assert clock.sleeps[0] == pytest.approx(0.01)
    # Each sleep but the last (cut short by the deadline) is the one before it times 1.5, up to the maximum.
    for before, after in zip(clock.sleeps[:-2], clock.sleeps[1:-1], strict=True):
        assert after == pytest.approx(min(before * 1.5, 0.08))
    assert clock.sleeps[-1] <= 0.08
    assert max(clock.sleeps) == pytest.approx(0.08)
    assert sum(clock.sleeps) == pytest.approx(0.5)


def test_the_last_sleep_does_not_overshoot_the_deadline(clock: FakeClock) -> None:
    with pytest.raises(WaitTimeout):
        wait_for("x", lambda: None, 0.1, interval=5.0, max_interval=5.0)
    assert clock.sleeps == [pytest.approx(0.1)]


def test_deadline(clock: FakeClock) -> None:
    d = Deadline(0.05)  # on the fake clock: no scheduler stall can move this test's verdict
    assert not d.expired()
    assert d.remaining() == pytest.approx(0.05)
    clock.now += 0.03
    assert not d.expired()
    assert d.remaining() == pytest.approx(0.02)
    assert d.elapsed() == pytest.approx(0.03)
    clock.now += 0.03
    assert d.expired()
    assert d.remaining() == 0.0
    assert d.elapsed() == pytest.approx(0.06)
