"""The guest's clock after a restore, set through the guest agent without a shell.

A restored guest wakes at the time its state was saved. Its offset from the host's clock is read with
``guest-get-time`` (no process in the guest), and the agent starts GNU ``date -s "<offset> seconds"``
directly, without a shell: date adds the shift to the clock it reads itself, so the time the process takes
to start does not count, only the few milliseconds between its read and its ``settimeofday`` (a lead,
learned from each try). The result is read back, and a clock still off by more than :data:`CLOCK_TOLERANCE`
is shifted once more.

Where that ``date`` cannot run (busybox, or ``guest-exec`` blocked), ``guest-set-time`` is sent with the host's
time in nanoseconds. It is exact as well, but qemu-guest-agent then copies the time to the RTC with ``hwclock -w``,
which busy-waits for the RTC's next second: about a second of the guest's CPU on every restore (measured:
1.0 s of QEMU's CPU per call under TCG, against 0.18-0.37 s for the ``date``). Neither path touches the RTC
otherwise, and the guest never reads it after its boot.
"""

from __future__ import annotations

import logging
import time

from .channels.agent import Agent, AgentError, AgentRefused
from .waiting import Deadline

log = logging.getLogger("pytest_vmfixtures")

CLOCK_TOLERANCE = 0.05  # s: how far a restored guest's clock may be from the host's
SET_ATTEMPTS = 2
READS = 3  # guest-get-time round trips per reading; the shortest bounds the offset best
APPLIED = 1.0  # s: a clock nearer than this after guest-set-time was set by it (a restored one is minutes off)
DATE = "/bin/date"  # GNU coreutils' (busybox's cannot shift by a relative time and fails: guest-set-time then)
LEAD = 0.015  # s: how long date takes from reading the clock to setting it, first guess (TCG: 12-43 ms measured)


def guest_clock_offset(agent: Agent, timeout: float = 10.0) -> tuple[float, float] | None:
    """The guest's clock minus the host's (s) and how far off that figure may be (half the round trip of the
    ``guest-get-time`` it comes from, the shortest of :data:`READS`); None if the agent does not offer it."""
    best: tuple[float, float] | None = None
    for _ in range(READS):
        try:
            before = time.time_ns()
            guest = agent.call("guest-get-time", None, timeout)
            after = time.time_ns()
        except AgentRefused:
            return None
        if not isinstance(guest, int):
            return None
        reading = ((guest - (before + after) / 2) / 1e9, (after - before) / 2e9)
        if best is None or reading[1] < best[1]:
            best = reading
    return best


def proven(reading: tuple[float, float]) -> bool:
    """The offset is within :data:`CLOCK_TOLERANCE`, its uncertainty included."""
    return abs(reading[0]) + reading[1] <= CLOCK_TOLERANCE


def set_clock_by_agent(agent: Agent, timeout: float) -> float | None:
    """Set the guest's clock to the host's; the offset measured after (s), None if the agent cannot read or set
    it (the caller then sets it another way). A channel that breaks raises.

    ``date`` first, ``guest-set-time`` where it cannot run; each set again (once) unless the offset is
    proven within :data:`CLOCK_TOLERANCE`.
    """
    reading = guest_clock_offset(agent, timeout)
    if reading is None:
        return None
    if proven(reading):
        return reading[0]
    shifted = shift_by_date(agent, reading, timeout)
    if shifted is not None and proven(shifted):
        return shifted[0]
    return set_by_guest_set_time(agent, timeout)


def shift_by_date(agent: Agent, reading: tuple[float, float], timeout: float) -> tuple[float, float] | None:
    """Shift the guest's clock by the offset read with ``date -s "<s> seconds"``; the reading after the last
    try, or None if that date does not run or fails (no GNU date, guest-exec blocked)."""
    lead = LEAD
    for _ in range(SET_ATTEMPTS):
        offset = reading[0]
        if not run_date(agent, f"{lead - offset:+.9f} seconds", timeout):
            return None
        after = guest_clock_offset(agent, timeout)
        if after is None:
            return None
        # After: offset + shift - (the time date took) = lead - taken. What it took is the next try's lead.
        lead, reading = max(0.0, lead - after[0]), after
        if proven(reading):
            break
    log.debug("%s: guest clock %+.3f s (+-%.3f) off the host's after date", agent.name, *reading)
    return reading


def run_date(agent: Agent, shift: str, timeout: float) -> bool:
    """``date -s SHIFT`` started by the agent without a shell, waited for; False if it did not run or failed."""
    try:
        pid = agent.call("guest-exec", {"path": DATE, "arg": ["-s", shift], "capture-output": True}, timeout)["pid"]
    except AgentRefused as exc:
        log.debug("%s: %s did not start: %s", agent.name, DATE, exc)
        return False
    deadline = Deadline(timeout)
    delay = 0.005
    while True:
        status = agent.call("guest-exec-status", {"pid": pid}, max(1.0, deadline.remaining()))
        if status.get("exited"):
            return bool(status.get("exitcode") == 0)
        if deadline.expired():
            raise AgentError(f"{agent.name}: {DATE} -s did not end within {timeout:g} s")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.05)


def set_by_guest_set_time(agent: Agent, timeout: float) -> float | None:
    """Set the clock with ``guest-set-time`` (the agent's ``hwclock -w`` included); the offset after, None if the
    agent cannot set or read it."""
    reading: tuple[float, float] | None = None
    for _ in range(SET_ATTEMPTS):
        try:
            agent.call("guest-set-time", {"time": time.time_ns()}, timeout)
        except AgentRefused as exc:  # no hwclock in the guest (the time is set), or the command is blocked
            log.debug("%s: guest-set-time answered %s", agent.name, exc)
        reading = guest_clock_offset(agent, timeout)
        if reading is None:
            return None
        if proven(reading):
            return reading[0]
    assert reading is not None
    offset, uncertainty = reading
    log.debug("%s: guest clock %+.3f s (+-%.3f) off the host's after guest-set-time", agent.name, offset, uncertainty)
    return offset if abs(offset) < APPLIED else None
