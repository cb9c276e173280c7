"""The clock after a restore: guest-set-time with the host's time, read back, set again or set by a shell.

The agent here is a stand-in that keeps a guest clock as an offset from the host's: a real guest agent
cannot be made on demand to apply a time late, to lack hwclock, or to block guest-set-time.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest

from pytest_vmfixtures.channels.agent import AgentRefused
from pytest_vmfixtures.clock import CLOCK_TOLERANCE, guest_clock_offset, set_clock_by_agent
from pytest_vmfixtures.command import CommandResult
from pytest_vmfixtures.instance import Instance, warm_up

RESTORED_BEHIND = -3 * 3600.0  # a state saved three hours ago


class ClockAgent:
    """A guest agent whose clock is the host's plus ``offset``. ``lags``: per guest-set-time, how late (s) the
    guest applies the time it was sent; ``hwclock``: False answers guest-set-time with hwclock's failure after
    setting the time, as qemu-ga does in a guest without it; ``blocked``: commands it refuses without acting."""

    name = "guest-1"

    def __init__(self, lags: list[float] | None = None, hwclock: bool = True, blocked: tuple[str, ...] = ()) -> None:
        self.offset = RESTORED_BEHIND
        self.lags = list(lags or [0.002])
        self.hwclock, self.blocked = hwclock, blocked
        self.calls: list[str] = []
        self.commands: list[str] = []

    def call(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        self.calls.append(command)
        if command in self.blocked:
            raise AgentRefused(f"{self.name}: guest agent {command!r} failed: command disabled")
        if command == "guest-get-time":
            return int((time.time() + self.offset) * 1e9)
        if command == "guest-set-time":
            assert arguments is not None
            lag = self.lags.pop(0) if len(self.lags) > 1 else self.lags[0]
            self.offset = arguments["time"] / 1e9 - time.time() - lag  # the time sent, applied ``lag`` later
            if not self.hwclock:
                raise AgentRefused(f"{self.name}: guest agent 'guest-set-time' failed: hwclock failed to set hardware clock")
            return {}
        raise AssertionError(f"unexpected {command}")

    def connect(self, timeout: float) -> None:
        pass

    def exec(self, command: str, tag: str, timeout: float | None, **_: object) -> CommandResult:
        self.commands.append(command)
        if command.startswith("date -u -s @"):  # the shell's date: the time computed before the shell started
            self.offset = float(command.split("@", 1)[1].split()[0]) - time.time() - 0.5
        return CommandResult(command, 0, "", "")


def test_the_clock_is_set_with_the_hosts_time_and_read_back() -> None:
    agent = ClockAgent(lags=[0.01])
    offset = set_clock_by_agent(agent, 10.0)  # type: ignore[arg-type]
    assert offset is not None and -0.02 < offset <= 0
    assert abs(agent.offset) < CLOCK_TOLERANCE
    assert agent.calls.count("guest-set-time") == 1


def test_a_guest_without_hwclock_has_its_clock_set_all_the_same() -> None:
    agent = ClockAgent(hwclock=False)
    offset = set_clock_by_agent(agent, 10.0)  # type: ignore[arg-type]
    assert offset is not None and abs(offset) < CLOCK_TOLERANCE
    assert agent.calls.count("guest-set-time") == 1


def test_a_time_applied_too_late_is_set_once_more() -> None:
    agent = ClockAgent(lags=[0.2, 0.003])
    offset = set_clock_by_agent(agent, 10.0)  # type: ignore[arg-type]
    assert agent.calls.count("guest-set-time") == 2
    assert offset is not None and abs(offset) < CLOCK_TOLERANCE


def test_an_offset_never_proven_is_still_reported_if_the_set_took() -> None:
    agent = ClockAgent(lags=[0.2])  # always 200 ms late: set, but not as near as the tolerance
    offset = set_clock_by_agent(agent, 10.0)  # type: ignore[arg-type]
    assert agent.calls.count("guest-set-time") == 2
    assert offset is not None and offset == pytest.approx(-0.2, abs=0.02)


def test_a_blocked_guest_set_time_gives_none() -> None:
    agent = ClockAgent(blocked=("guest-set-time",))
    assert set_clock_by_agent(agent, 10.0) is None  # type: ignore[arg-type]
    assert agent.offset == RESTORED_BEHIND


def test_a_blocked_guest_get_time_gives_none() -> None:
    agent = ClockAgent(blocked=("guest-get-time",))
    assert guest_clock_offset(agent) is None  # type: ignore[arg-type]
    assert set_clock_by_agent(agent, 10.0) is None  # type: ignore[arg-type]


def test_the_offset_is_bounded_by_the_shortest_round_trip() -> None:
    agent = ClockAgent()
    agent.offset = 0.123
    reading = guest_clock_offset(agent)  # type: ignore[arg-type]
    assert reading is not None
    offset, uncertainty = reading
    assert abs(offset - 0.123) <= uncertainty + 1e-6
    assert agent.calls.count("guest-get-time") == 3


def instance_with(agent: ClockAgent) -> Instance:
    return Instance(machine=SimpleNamespace(name="guest-1"), ssh=None, agent=agent)  # type: ignore[arg-type]


def test_warm_up_sets_the_clock_without_a_shell_and_records_the_offset() -> None:
    agent = ClockAgent()
    instance = instance_with(agent)
    warm_up(instance, image=None, timeout=10.0)  # type: ignore[arg-type]
    assert agent.commands == []  # no process started in the guest by us
    assert instance.clock_offset is not None and abs(instance.clock_offset) < CLOCK_TOLERANCE


def test_warm_up_falls_back_to_the_shells_date_where_the_agent_cannot_set_the_time() -> None:
    agent = ClockAgent(blocked=("guest-set-time",))
    instance = instance_with(agent)
    warm_up(instance, image=None, timeout=10.0)  # type: ignore[arg-type]
    assert len(agent.commands) == 1 and agent.commands[0].startswith("date -u -s @")
    assert instance.clock_offset == pytest.approx(-0.5, abs=0.05)  # what the shell's start cost, measured
