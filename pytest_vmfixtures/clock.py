"""The guest's clock after a restore, set through the guest agent without a shell.

A restored guest wakes at the time its state was saved. Where it has qemu-guest-agent, ``guest-set-time`` is
sent with the host's time in nanoseconds taken as the request leaves: the agent calls ``settimeofday`` in its
own process when it reads the request, so no shell or ``date`` has to start first (starting one after a
restore costs half a second under TCG, and a time computed before it started was that much behind).
The agent then copies the time to the RTC with ``hwclock -w`` and answers when that ends; a guest without
``hwclock`` answers with an error although its clock was set. Either way the result is read back with
``guest-get-time`` (no process in the guest) against the host's clock on both sides of the call, and a
clock still off by more than :data:`CLOCK_TOLERANCE` is set once more.
"""

from __future__ import annotations

import logging
import time

from .channels.agent import Agent, AgentRefused

log = logging.getLogger("pytest_vmfixtures")

CLOCK_TOLERANCE = 0.05  # s: how far a restored guest's clock may be from the host's
SET_ATTEMPTS = 2
READS = 3  # guest-get-time round trips per reading; the shortest bounds the offset best
APPLIED = 1.0  # s: a clock nearer than this after guest-set-time was set by it (a restored one is minutes off)


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


def set_clock_by_agent(agent: Agent, timeout: float) -> float | None:
    """Set the guest's clock to the host's with ``guest-set-time``; the offset measured after (s), None if
    the agent cannot set or read it (the caller then sets it another way). A channel that breaks raises.

    Set again (once) unless the offset is proven within :data:`CLOCK_TOLERANCE`, its uncertainty included.
    """
    reading: tuple[float, float] | None = None
    for _ in range(SET_ATTEMPTS):
        try:
            agent.call("guest-set-time", {"time": time.time_ns()}, timeout)
        except AgentRefused as exc:  # no hwclock in the guest (the time is set), or the command is blocked
            log.debug("%s: guest-set-time answered %s", agent.name, exc)
        reading = guest_clock_offset(agent, timeout)
        if reading is None:
            return None
        if abs(reading[0]) + reading[1] <= CLOCK_TOLERANCE:
            return reading[0]
    assert reading is not None
    offset, uncertainty = reading
    log.debug("%s: guest clock %+.3f s (+-%.3f) off the host's after guest-set-time", agent.name, offset, uncertainty)
    return offset if abs(offset) < APPLIED else None
