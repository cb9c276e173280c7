"""The clock after a restore: shifted by GNU date started without a shell, else guest-set-time with the host's
time, read back, set again, or set by a shell.

The agent here is a stand-in that keeps a guest clock as an offset from the host's: a real guest agent
cannot be made on demand to apply a time late, to lack hwclock or GNU date, or to block a command. The real
guests' clock is checked after a revert in tests/integration/test_revert.py.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest

from pytest_vmfixtures.channels.agent import AgentRefused
from pytest_vmfixtures.clock import CLOCK_TOLERANCE, LEAD, guest_clock_offset, set_by_guest_set_time, set_clock_by_agent
from pytest_vmfixtures.command import CommandResult
from pytest_vmfixtures.instance import Instance, warm_up

RESTORED_BEHIND = -3 * 3600.0  # a state saved three hours ago


class ClockAgent:
    """A guest agent whose clock is the host's plus ``offset``. ``lags``: per guest-set-time, how late (s) the
    guest applies the time it was sent; ``hwclock``: False answers guest-set-time with hwclock's failure after
    setting the time, as qemu-ga does in a guest without it; ``date_lags``: per ``date -s``, how long the guest's
    date takes from reading the clock to setting it, or None for a busybox date that cannot shift (exit 1);
    ``blocked``: commands it refuses without acting."""

    name = "guest-1"

    def __init__(self, lags: list[float] | None = None, hwclock: bool = True, blocked: tuple[str, ...] = (),
                 date_lags: list[float] | None = None) -> None:
        self.offset = RESTORED_BEHIND
        self.lags = list(lags or [0.002])
        self.date_lags = date_lags
        self.exit = 0
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
        if command == "guest-exec":
            assert arguments is not None and arguments["path"] == "/bin/date" and arguments["arg"][0] == "-s"
            self.exit = 1
            if self.date_lags is not None:  # GNU date: the shift added to the clock as it read it, set ``lag`` later
                lag = self.date_lags.pop(0) if len(self.date_lags) > 1 else self.date_lags[0]
                self.offset += float(arguments["arg"][1].removesuffix(" seconds")) - lag
                self.exit = 0
            return {"pid": 42}
        if command == "guest-exec-status":
            return {"exited": True, "exitcode": self.exit}
        raise AssertionError(f"unexpected {command}")

    def connect(self, timeout: float) -> None:
        pass

    def exec(self, command: str, tag: str, timeout: float | None, **_: object) -> CommandResult:
        self.commands.append(command)
        if command.startswith("date -u -s @"):  # the shell's date: the time computed before the shell started
            self.offset = float(command.split("@", 1)[1].split()[0]) - time.time() - 0.5
        return CommandResult(command, 0, "", "")


def test_guest_set_time_sets_the_hosts_time_and_reads_it_back() -> None:
    agent = ClockAgent(lags=[0.01])
    offset = set_by_guest_set_time(agent, 10.0)  # type: ignore[arg-type]
    assert offset is not None and -0.02 < offset <= 0
    assert abs(agent.offset) < CLOCK_TOLERANCE
    assert agent.calls.count("guest-set-time") == 1


def test_a_guest_without_hwclock_has_its_clock_set_all_the_same() -> None:
    agent = ClockAgent(hwclock=False)
    offset = set_by_guest_set_time(agent, 10.0)  # type: ignore[arg-type]
    assert offset is not None and abs(offset) < CLOCK_TOLERANCE
    assert agent.calls.count("guest-set-time") == 1


def test_a_time_applied_too_late_is_set_once_more() -> None:
    agent = ClockAgent(lags=[0.2, 0.003])
    offset = set_by_guest_set_time(agent, 10.0)  # type: ignore[arg-type]
    assert agent.calls.count("guest-set-time") == 2
    assert offset is not None and abs(offset) < CLOCK_TOLERANCE


def test_an_offset_never_proven_is_still_reported_if_the_set_took() -> None:
    agent = ClockAgent(lags=[0.2])  # always 200 ms late: set, but not as near as the tolerance
    offset = set_by_guest_set_time(agent, 10.0)  # type: ignore[arg-type]
    assert agent.calls.count("guest-set-time") == 2
    assert offset is not None and offset == pytest.approx(-0.2, abs=0.02)


def test_a_blocked_guest_set_time_gives_none() -> None:
    agent = ClockAgent(blocked=("guest-set-time",))
    assert set_clock_by_agent(agent, 10.0) is None  # type: ignore[arg-type]  # busybox date, guest-set-time blocked
    assert agent.offset == RESTORED_BEHIND


def test_gnu_date_shifts_the_clock_by_the_offset_read_and_no_hwclock_runs() -> None:
    agent = ClockAgent(date_lags=[0.025])
    offset = set_clock_by_agent(agent, 10.0)  # type: ignore[arg-type]
    assert offset is not None and abs(offset) < CLOCK_TOLERANCE
    assert offset == pytest.approx(LEAD - 0.025, abs=0.01)
    assert agent.calls.count("guest-exec") == 1 and "guest-set-time" not in agent.calls


def test_a_date_slower_than_the_lead_is_shifted_again_by_what_it_took() -> None:
    agent = ClockAgent(date_lags=[0.3, 0.3])  # a loaded host: date takes 300 ms from its read to its set
    offset = set_clock_by_agent(agent, 10.0)  # type: ignore[arg-type]
    assert agent.calls.count("guest-exec") == 2 and "guest-set-time" not in agent.calls
    assert offset is not None and abs(offset) < 0.01


def test_a_busybox_date_gives_way_to_guest_set_time() -> None:
    agent = ClockAgent()  # date exits 1: it cannot shift by a relative time
    offset = set_clock_by_agent(agent, 10.0)  # type: ignore[arg-type]
    assert agent.calls.count("guest-exec") == 1 and agent.calls.count("guest-set-time") == 1
    assert offset is not None and abs(offset) < CLOCK_TOLERANCE


def test_a_blocked_guest_exec_gives_way_to_guest_set_time() -> None:
    agent = ClockAgent(blocked=("guest-exec",), date_lags=[0.01])
    offset = set_clock_by_agent(agent, 10.0)  # type: ignore[arg-type]
    assert agent.calls.count("guest-set-time") == 1
    assert offset is not None and abs(offset) < CLOCK_TOLERANCE


def test_a_clock_already_right_is_left_alone() -> None:
    agent = ClockAgent(date_lags=[0.01])
    agent.offset = 0.001
    offset = set_clock_by_agent(agent, 10.0)  # type: ignore[arg-type]
    assert offset == pytest.approx(0.001, abs=0.005)
    assert "guest-exec" not in agent.calls and "guest-set-time" not in agent.calls


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
    agent = ClockAgent(date_lags=[0.02])
    instance = instance_with(agent)
    warm_up(instance, image=None, timeout=10.0)  # type: ignore[arg-type]
    assert agent.commands == []  # no shell: date was started by the agent itself
    assert "guest-set-time" not in agent.calls
    assert instance.clock_offset is not None and abs(instance.clock_offset) < CLOCK_TOLERANCE


def test_warm_up_falls_back_to_the_shells_date_where_the_agent_cannot_set_the_time() -> None:
    agent = ClockAgent(blocked=("guest-set-time",))
    instance = instance_with(agent)
    warm_up(instance, image=None, timeout=10.0)  # type: ignore[arg-type]
    assert len(agent.commands) == 1 and agent.commands[0].startswith("date -u -s @")
    assert instance.clock_offset == pytest.approx(-0.5, abs=0.05)  # what the shell's start cost, measured
