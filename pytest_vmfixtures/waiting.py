"""The one polling helper: every wait in the plugin has a name and a deadline.

A wait that runs out makes one last diagnostic attempt and puts what it found
into the error, so a timeout is never a bare "timed out".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from .errors import WaitTimeout

T = TypeVar("T")
log = logging.getLogger("pytest_vmfixtures")


class Deadline:
    """A point on the monotonic clock; ``remaining()`` never goes below zero."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.monotonic()
        self.at = self.start + seconds

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def wait_for(
    step: str,
    attempt: Callable[[], T | None],
    timeout: float,
    *,
    interval: float = 0.05,
    max_interval: float = 0.5,
    diagnose: Callable[[], str] | None = None,
    error: Callable[[str], Exception] = WaitTimeout,
) -> T:
    """Call ``attempt`` until it returns something other than None.

    ``attempt`` may raise to abort the wait (for instance when the QEMU
    process died: no point in waiting out the deadline). The interval backs
    off from ``interval`` to ``max_interval``.
    """
    deadline = Deadline(timeout)
    delay = interval
    log.debug("waiting for %s (deadline %.1f s)", step, timeout)
    while True:
        result = attempt()
        if result is not None:
            log.debug("%s after %.2f s", step, deadline.elapsed())
            return result
        if deadline.expired():
            detail = ""
            if diagnose is not None:
                try:
                    detail = diagnose()
                except Exception as exc:  # the diagnosis is best effort
                    detail = f"(diagnosis failed: {exc})"
            message = f"timed out after {timeout:g} s waiting for {step}"
            if detail:
                message += f": {detail}"
            raise error(message)
        time.sleep(min(delay, deadline.remaining()))
        delay = min(delay * 1.5, max_interval)
