"""One exception tree for everything the plugin raises.

Users catch :class:`VMError` to catch them all; each child says which part
broke so a report can tell "the test failed" from "the machinery broke".
"""

from __future__ import annotations

from collections.abc import Sequence


class VMError(Exception):
    """Base of every error pytest-vmfixtures raises."""


class ImageError(VMError):
    """An image could not be found, built, downloaded or verified."""


class BootError(VMError):
    """A guest did not become ready; carries the console tail and command line."""

    def __init__(
        self,
        message: str,
        *,
        console_tail: str = "",
        command_line: Sequence[str] = (),
        diagnosis: str = "",
    ) -> None:
        self.console_tail = console_tail
        self.command_line = list(command_line)
        self.diagnosis = diagnosis
        parts = [message]
        if diagnosis:
            parts.append(f"diagnosis: {diagnosis}")
        if command_line:
            parts.append("command line: " + " ".join(command_line))
        if console_tail:
            parts.append("last console lines:\n" + console_tail)
        super().__init__("\n".join(parts))


class GuestError(VMError):
    """The guest or its QEMU process went away or misbehaved mid-test."""


class CommandLost(GuestError):
    """The guest agent stopped answering after it started a command, so its outcome is unknown.

    The command is never run a second time over another channel; ``killed`` names the channel
    that killed what was left of it ("" if neither could).
    """

    def __init__(self, guest: str, command: str, reason: str, killed: str) -> None:
        self.command = command
        self.reason = reason
        self.killed = killed
        fate = f"killed through {killed}" if killed else "it may still be running (no channel could kill it)"
        super().__init__(f"{guest}: the guest agent stopped answering after it started {command!r} ({reason}); "
                         f"its outcome is unknown and it was not run again; {fate}")


class CommandError(VMError):
    """A command run with ``check=True`` exited non-zero."""

    def __init__(self, command: str, returncode: int, stdout: str, stderr: str) -> None:
        self.command = command
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        tail = stderr.strip().splitlines()[-5:]
        detail = ("\nstderr:\n" + "\n".join(tail)) if tail else ""
        super().__init__(f"command {command!r} exited with {returncode}{detail}")


class CommandTimeout(VMError):
    """A command outlived its timeout; it was killed and the guest is still usable."""

    def __init__(self, command: str, timeout: float, stdout: str = "", stderr: str = "") -> None:
        self.command = command
        self.timeout = timeout
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(f"command {command!r} did not finish within {timeout:g} s")


class QMPError(VMError):
    """A QMP command failed; carries the error class and description QEMU gave."""

    def __init__(self, command: str, error_class: str, description: str) -> None:
        self.command = command
        self.error_class = error_class
        self.description = description
        super().__init__(f"QMP {command!r} failed: {error_class}: {description}")


class SnapshotError(VMError):
    """A snapshot could not be taken or restored."""


class WaitTimeout(VMError):
    """A deadline passed while waiting for a named step."""


class MissingExtra(VMError, ImportError):
    """A feature needs an optional extra that is not installed (or too old); the message names the pip command."""
