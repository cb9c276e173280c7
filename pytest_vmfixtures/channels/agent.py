"""A client for qemu-guest-agent over its virtio-serial port.

Why: after a revert an SSH session must be set up again (key exchange,
authentication); the agent's socket needs no handshake, so ``vm.run`` answers
sooner. The wire format is newline-delimited JSON; ``guest-sync-delimited``
re-aligns the stream after a restore, when the guest side may hold a half
read request from the moment the state was saved.

The channel is pluggable: by default the agent's unix socket is opened here,
but a backend that owns the socket itself (libvirt) hands over an
:class:`AgentTransport` that carries one request and its reply at a time;
``exec``, timeouts and kill-on-timeout are the same either way.
"""

from __future__ import annotations

import base64
import json
import random
import socket
import time
from pathlib import Path
from typing import Any, Protocol

from ..command import CommandResult, agent_environment, agent_script, kill_script
from ..errors import CommandTimeout, GuestError
from ..waiting import Deadline

SYNC_MARKER = b"\xff"
MAX_REPLY_BYTES = 256 << 20  # one reply (a command's output, base64) is far smaller; past it the agent is broken


class AgentError(GuestError):
    """The guest agent refused a command or the channel broke."""


class AgentTransport(Protocol):
    """Carries agent requests for a backend that owns the agent's channel.

    ``call`` returns the reply's ``return`` value and raises :class:`AgentError`
    for an error reply, a broken channel or no answer within ``timeout``.
    """

    @property
    def connected(self) -> bool: ...

    def connect(self, timeout: float) -> None:
        """Make sure the agent answers (the transport re-synchronises as it needs)."""
        ...

    def call(self, command: str, arguments: dict[str, Any] | None, timeout: float) -> Any: ...

    def close(self) -> None: ...


class Agent:
    def __init__(self, socket_path: Path | None, name: str, transport: AgentTransport | None = None) -> None:
        if socket_path is None and transport is None:
            raise ValueError("an Agent needs a socket path or a transport")
        self.socket_path = socket_path
        self.name = name
        self.transport = transport
        self._sock: socket.socket | None = None
        self._buffer = b""

    @classmethod
    def over(cls, transport: AgentTransport, name: str) -> Agent:
        """An agent whose requests go through ``transport`` instead of a socket of ours."""
        return cls(None, name, transport)

    # -- connection -------------------------------------------------------
    def connect(self, timeout: float) -> None:
        """Open the socket and re-synchronise; raises AgentError if the agent does not answer."""
        self.close()
        if self.transport is not None:
            self.transport.connect(timeout)
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(self.socket_path))
        except OSError as exc:
            sock.close()
            raise AgentError(f"{self.name}: cannot open guest agent socket: {exc}") from exc
        self._sock = sock
        self._buffer = b""
        try:
            self._sync(timeout)
        except TimeoutError:
            self.close()
            raise AgentError(f"{self.name}: guest agent did not answer the sync within {timeout:g} s") from None

    def _sync(self, timeout: float) -> None:
        deadline = Deadline(timeout)
        token = random.randrange(1, 2**31)
        # A lone 0xff makes the agent drop whatever partial request it holds.
        self._send_raw(SYNC_MARKER + self._encode("guest-sync-delimited", {"id": token}))
        self._read_until_marker(deadline)
        while True:
            reply = self._read_message(deadline)
            if reply.get("return") == token:
                return

    @property
    def connected(self) -> bool:
        if self.transport is not None:
            return self.transport.connected
        return self._sock is not None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            return
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    # -- wire -------------------------------------------------------------
    @staticmethod
    def _encode(command: str, arguments: dict[str, Any] | None) -> bytes:
        message: dict[str, Any] = {"execute": command}
        if arguments is not None:
            message["arguments"] = arguments
        return json.dumps(message).encode() + b"\n"

    def _send_raw(self, data: bytes) -> None:
        if self._sock is None:
            raise AgentError(f"{self.name}: guest agent is not connected")
        try:
            self._sock.sendall(data)
        except OSError as exc:
            self.close()
            raise AgentError(f"{self.name}: guest agent connection lost: {exc}") from exc

    def _recv(self, deadline: Deadline) -> None:
        assert self._sock is not None
        remaining = deadline.remaining()
        if remaining <= 0:
            raise TimeoutError
        self._sock.settimeout(remaining)
        try:
            chunk = self._sock.recv(65536)
        except TimeoutError:
            raise  # the caller decides: a timeout is not a broken connection
        except OSError as exc:
            self.close()
            raise AgentError(f"{self.name}: guest agent connection lost: {exc}") from exc
        if not chunk:
            self.close()
            raise AgentError(f"{self.name}: guest agent closed the connection")
        self._buffer += chunk

    def _read_until_marker(self, deadline: Deadline) -> None:
        while SYNC_MARKER not in self._buffer:
            self._buffer = b""
            self._recv(deadline)
        self._buffer = self._buffer.split(SYNC_MARKER, 1)[1]

    def _read_message(self, deadline: Deadline) -> dict[str, Any]:
        scanned = 0  # only what came since is searched for the newline: a long reply costs O(n), not O(n²)
        while self._buffer.find(b"\n", scanned) < 0:
            scanned = len(self._buffer)
            if scanned > MAX_REPLY_BYTES:
                self.close()
                raise AgentError(f"{self.name}: guest agent sent over {MAX_REPLY_BYTES} bytes without a newline; "
                                 "dropping the connection")
            self._recv(deadline)
        line, self._buffer = self._buffer.split(b"\n", 1)
        line = line.strip()
        if not line:
            return {}
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise AgentError(f"{self.name}: guest agent sent garbage: {line[:80]!r}") from exc
        return message if isinstance(message, dict) else {}

    def call(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        if self.transport is not None:
            return self.transport.call(command, arguments, timeout)
        deadline = Deadline(timeout)
        self._send_raw(self._encode(command, arguments))
        try:
            reply = self._read_message(deadline)
        except TimeoutError as exc:
            # A late reply would be mistaken for the next one's: start over next time.
            self.close()
            raise AgentError(f"{self.name}: guest agent did not answer {command!r} within {timeout:g} s") from exc
        if "error" in reply:
            error = reply["error"]
            raise AgentError(f"{self.name}: guest agent {command!r} failed: {error.get('desc', error)}")
        return reply.get("return")

    # -- commands ---------------------------------------------------------
    def exec(self, command: str, tag: str, timeout: float | None, channel_timeout: float = 30.0) -> CommandResult:
        started = time.monotonic()
        pid = self.call(
            "guest-exec",
            {
                "path": "/bin/sh",
                "arg": ["-c", agent_script(command)],
                "env": agent_environment(tag),
                "capture-output": True,
            },
            channel_timeout,
        )["pid"]
        deadline = Deadline(timeout) if timeout is not None else None
        delay = 0.002
        while True:
            status = self.call("guest-exec-status", {"pid": pid}, channel_timeout)
            if status.get("exited"):
                return self._result(command, status, time.monotonic() - started)
            if deadline is not None and deadline.expired():
                self._kill(tag, channel_timeout)
                partial = self._reap(pid, channel_timeout)
                raise CommandTimeout(command, timeout or 0.0, _decode(partial, "out-data"), _decode(partial, "err-data"))
            time.sleep(delay if deadline is None else min(delay, deadline.remaining()))
            delay = min(delay * 1.5, 0.05)

    def _kill(self, tag: str, timeout: float) -> None:
        pid = self.call("guest-exec", {"path": "/bin/sh", "arg": ["-c", kill_script(tag)]}, timeout)["pid"]
        deadline = Deadline(timeout)
        while not deadline.expired():
            if self.call("guest-exec-status", {"pid": pid}, timeout).get("exited"):
                return
            time.sleep(0.01)

    def _reap(self, pid: int, timeout: float) -> dict[str, Any]:
        deadline = Deadline(5.0)
        while not deadline.expired():
            status: dict[str, Any] = self.call("guest-exec-status", {"pid": pid}, timeout)
            if status.get("exited"):
                return status
            time.sleep(0.02)
        return {}

    @staticmethod
    def _result(command: str, status: dict[str, Any], duration: float) -> CommandResult:
        code = status.get("exitcode")
        if code is None:  # killed by a signal: report it the way a shell would
            code = 128 + int(status.get("signal", 0))
        return CommandResult(command, int(code), _decode(status, "out-data"), _decode(status, "err-data"), duration)


def _decode(status: dict[str, Any], key: str) -> str:
    data = status.get(key)
    if not data:
        return ""
    return base64.b64decode(data).decode("utf-8", errors="replace")
