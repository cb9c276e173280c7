"""QMP and the guest agent of a libvirt domain, through libvirt.

libvirt owns both sockets: QMP goes through its monitor pass-through
(``virDomainQemuMonitorCommand``), agent commands through
``virDomainQemuAgentCommand``. The classes have the interfaces of
channels.qmp.QMP and channels.agent's transports, so nothing above the
backend tells them apart.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from ...channels.agent import AgentError, AgentRefused
from ...errors import GuestError, QMPError
from ...waiting import Deadline
from .calls import bounded, libvirt, libvirt_qemu

DEFAULT_TIMEOUT = 60.0


class LibvirtQMP:
    """``Machine.qmp`` through libvirt's monitor pass-through, with channels.qmp.QMP's interface."""

    def __init__(self, domain: Any, name: str) -> None:
        self.domain = domain
        self.name = name
        self._closed = False

    def connect(self, timeout: float = 10.0) -> None:
        """Nothing to open: libvirt holds the monitor."""

    def _run(self, command: str, message: dict[str, Any], timeout: float, files: list[int] | None = None) -> Any:
        if self._closed:
            raise GuestError(f"{self.name}: QMP handle is closed (the guest was reverted or stopped)")
        text = json.dumps(message)

        def call() -> str:
            if files is None:
                return str(libvirt_qemu.qemuMonitorCommand(self.domain, text, 0))
            out, _ = libvirt_qemu.qemuMonitorCommandWithFiles(self.domain, text, files, 0)
            return str(out)

        try:
            reply = json.loads(bounded(f"{self.name}: QMP {command!r}", call, timeout))
        except libvirt.libvirtError as exc:
            raise GuestError(f"{self.name}: QMP {command!r} through libvirt failed: {exc.get_error_message()}") from exc
        if "error" in reply:
            error = reply["error"]
            raise QMPError(command, str(error.get("class", "GenericError")), str(error.get("desc", error)))
        return reply.get("return")

    def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = DEFAULT_TIMEOUT) -> Any:
        """Run one QMP command; a QMP error raises :class:`QMPError` with QEMU's words."""
        message: dict[str, Any] = {"execute": command}
        if arguments is not None:
            message["arguments"] = arguments
        return self._run(command, message, timeout)

    def human(self, command_line: str, timeout: float = DEFAULT_TIMEOUT) -> str:
        """Run an HMP command (savevm, loadvm, ...); its text output is its only error channel."""
        return str(self.execute("human-monitor-command", {"command-line": command_line}, timeout))

    def send_fd(self, fd: int, fdname: str) -> None:
        """Hand QEMU an open file under ``fdname`` (libvirt passes it along with the command)."""
        self._run("getfd", {"execute": "getfd", "arguments": {"fdname": fdname}}, 10.0, files=[fd])

    def close(self) -> None:
        self._closed = True


# libvirt errors after which the agent channel is not trusted until connect() again.
BROKEN_AGENT = (
    {libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_NO_DOMAIN}
    if libvirt is not None else set()
)


class LibvirtAgentTransport:
    """Agent requests through ``virDomainQemuAgentCommand``; libvirt re-synchronises the channel itself."""

    def __init__(self, domain: Any, name: str) -> None:
        self.domain = domain
        self.name = name
        self._connected = False

    @property
    def connected(self) -> bool:
        return self._connected

    def connect(self, timeout: float) -> None:
        """Until the agent answers a ping.

        Right after a restore libvirt may still consider the agent's port closed: it
        learns that the guest has it open from an event QEMU sends once the saved
        state is loaded, so "not connected" is retried briefly.
        """
        deadline = Deadline(timeout)
        while True:
            self._connected = True
            try:
                self.call("guest-ping", None, max(1.0, deadline.remaining()))
                return
            except AgentError as exc:
                self._connected = False
                cause = exc.__cause__
                not_yet = isinstance(cause, libvirt.libvirtError) and (
                    cause.get_error_code() == libvirt.VIR_ERR_AGENT_UNRESPONSIVE and "not connected" in str(cause)
                )
                if not not_yet or deadline.remaining() <= 0.05:
                    raise
            time.sleep(0.02)

    def call(self, command: str, arguments: dict[str, Any] | None, timeout: float) -> Any:
        if not self._connected:
            raise AgentRefused(f"{self.name}: guest agent is not connected")
        message: dict[str, Any] = {"execute": command}
        if arguments is not None:
            message["arguments"] = arguments
        text = json.dumps(message)
        seconds = max(1, math.ceil(timeout))
        try:
            out = bounded(
                f"{self.name}: guest agent {command!r}",
                lambda: libvirt_qemu.qemuAgentCommand(self.domain, text, seconds, 0),
                seconds + 5,
            )
        except GuestError as exc:
            self._connected = False
            raise AgentError(str(exc)) from exc
        except libvirt.libvirtError as exc:
            failed = f"{self.name}: guest agent {command!r} failed: {exc.get_error_message()}"
            if exc.get_error_code() not in BROKEN_AGENT:
                raise AgentRefused(failed) from exc  # the agent (or libvirt) answered it with an error
            self._connected = False  # no answer, or no domain: start over next time
            if exc.get_error_code() == libvirt.VIR_ERR_AGENT_UNRESPONSIVE and "not connected" not in str(exc):
                raise AgentError(failed) from exc  # it may have been sent and run: only "not connected" says not
            raise AgentRefused(failed) from exc
        try:
            reply = json.loads(out)
        except (TypeError, ValueError) as exc:
            raise AgentError(f"{self.name}: guest agent sent garbage: {str(out)[:80]!r}") from exc
        if isinstance(reply, dict) and "error" in reply:
            error = reply["error"]
            raise AgentRefused(f"{self.name}: guest agent {command!r} failed: {error.get('desc', error)}")
        return reply.get("return") if isinstance(reply, dict) else None

    def close(self) -> None:
        self._connected = False
