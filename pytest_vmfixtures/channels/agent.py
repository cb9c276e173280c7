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
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ..command import CommandResult, agent_environment, agent_script, kill_script
from ..errors import CommandLost, CommandTimeout, GuestError
from ..waiting import Deadline

SYNC_MARKER = b"\xff"
MAX_REPLY_BYTES = 256 << 20  # one reply (a command's output, base64) is far smaller; past it the agent is broken
PING_SECONDS = 10.0  # before each command: an agent that does not answer a ping is sent nothing
KILL_SECONDS = 5.0  # for the kill after a timeout or a lost agent: an agent that answers does it in well under that


class AgentError(GuestError):
    """The guest agent refused a command or the channel broke."""


class AgentRefused(AgentError):
    """The request provably never ran: it was never sent, or the agent answered it with an error."""


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
    def __init__(self, socket_path: Path | None, name: str, transport: AgentTransport | None = None,
                 what: str = "guest agent") -> None:
        """``what``: how messages name the peer (the guest agent, or vmfx-runner, which speaks its protocol)."""
        if socket_path is None and transport is None:
            raise ValueError("an Agent needs a socket path or a transport")
        self.socket_path = socket_path
        self.name = name
        self.what = what
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
            raise AgentError(f"{self.name}: cannot open {self.what} socket: {exc}") from exc
        self._sock = sock
        self._buffer = b""
        try:
            self._sync(timeout)
        except TimeoutError:
            self.close()
            raise AgentError(f"{self.name}: {self.what} did not answer the sync within {timeout:g} s") from None

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
            raise AgentRefused(f"{self.name}: {self.what} is not connected")
        try:
            self._sock.sendall(data)
        except OSError as exc:  # the agent acts on a whole JSON object only: a part sent runs nothing
            self.close()
            raise AgentRefused(f"{self.name}: {self.what} connection lost: {exc}") from exc

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
            raise AgentError(f"{self.name}: {self.what} connection lost: {exc}") from exc
        if not chunk:
            self.close()
            raise AgentError(f"{self.name}: {self.what} closed the connection")
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
                raise AgentError(f"{self.name}: {self.what} sent over {MAX_REPLY_BYTES} bytes without a newline; "
                                 "dropping the connection")
            self._recv(deadline)
        line, self._buffer = self._buffer.split(b"\n", 1)
        line = line.strip()
        if not line:
            return {}
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise AgentError(f"{self.name}: {self.what} sent garbage: {line[:80]!r}") from exc
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
            raise AgentError(f"{self.name}: {self.what} did not answer {command!r} within {timeout:g} s") from exc
        if "error" in reply:
            error = reply["error"]
            raise AgentRefused(f"{self.name}: {self.what} {command!r} failed: {error.get('desc', error)}")
        return reply.get("return")

    # -- commands ---------------------------------------------------------
    def exec(self, command: str, tag: str, timeout: float | None, channel_timeout: float = 30.0,
             kill_elsewhere: Callable[[str], bool] | None = None, elsewhere: str = "another channel") -> CommandResult:
        """Run ``command``; AgentError only if it provably never started (the caller may use another channel).

        A ``guest-ping`` goes first: an agent stopped or frozen before the command is found there, when
        nothing has been sent yet, rather than by a ``guest-exec`` that gets no answer (which may have run).

        Once the agent has started it, a lost agent raises :class:`CommandLost` (the command is killed
        through the agent or else through ``kill_elsewhere``, the channel named ``elsewhere``; never run twice);
        past ``timeout`` it is killed the same way and :class:`CommandTimeout` is raised.
        """
        started = time.monotonic()
        try:  # a stopped or frozen agent is found here, before anything that could run was sent
            self.call("guest-ping", None, min(channel_timeout, PING_SECONDS))
        except AgentError as exc:
            raise AgentRefused(f"{self.name}: {self.what} does not answer; nothing was sent: {exc}") from exc
        try:
            pid = self.call("guest-exec", {"path": "/bin/sh", "arg": ["-c", agent_script(command)],
                                           "env": agent_environment(tag), "capture-output": True},
                            channel_timeout)["pid"]
        except AgentRefused:
            raise
        except AgentError as exc:  # sent, but no answer: it may have started
            raise self._lost(command, tag, f"no answer to guest-exec: {exc}", (kill_elsewhere, elsewhere)) from exc
        deadline = Deadline(timeout) if timeout is not None else None
        delay = 0.002
        while True:
            status = self._status(pid, command, tag, deadline, channel_timeout, (kill_elsewhere, elsewhere))
            if status.get("exited"):
                return self._result(command, status, time.monotonic() - started)
            if deadline is not None and deadline.expired():
                killed = self._kill(tag)
                partial = self._reap(pid) if killed else {}
                if not killed and kill_elsewhere is not None:
                    kill_elsewhere(tag)
                raise CommandTimeout(command, timeout or 0.0, _decode(partial, "out-data"), _decode(partial, "err-data"))
            time.sleep(delay if deadline is None else min(delay, deadline.remaining()))
            delay = min(delay * 1.5, 0.05)

    def _status(self, pid: int, command: str, tag: str, deadline: Deadline | None, channel_timeout: float,
                other: tuple[Callable[[str], bool] | None, str]) -> dict[str, Any]:
        """One ``guest-exec-status``; within the command's deadline a broken channel is reconnected once."""
        for attempt in (1, 2):
            # Past the command's deadline the reply gets KILL_SECONDS more: a slow agent is not a lost one.
            wait = channel_timeout if deadline is None else max(
                1.0, round(min(channel_timeout, deadline.remaining() + KILL_SECONDS), 1))
            try:
                status: dict[str, Any] = self.call("guest-exec-status", {"pid": pid}, wait)
                return status
            except AgentError as exc:
                failure = exc
            if attempt == 2 or (deadline is not None and deadline.expired()):
                break
            try:
                self.connect(min(10.0, max(1.0, deadline.remaining())) if deadline is not None else 10.0)
            except AgentError as exc:
                failure = exc
                break
        raise self._lost(command, tag, str(failure), other) from failure

    def _lost(self, command: str, tag: str, reason: str, other: tuple[Callable[[str], bool] | None, str]) -> CommandLost:
        """The error for a command the agent may have started and no longer reports on; kills what is left
        through the agent, else through ``other`` (a kill function and the name of its channel)."""
        killed = f"the {self.what}" if self._kill(tag) else ""
        kill_elsewhere, elsewhere = other
        if not killed and kill_elsewhere is not None and kill_elsewhere(tag):
            killed = elsewhere
        self.close()  # a late reply must not be read as the next request's
        return CommandLost(self.name, command, reason, killed)

    def _kill(self, tag: str) -> bool:
        """Kill the processes carrying ``tag`` through the agent, within KILL_SECONDS; whether it was done."""
        deadline = Deadline(KILL_SECONDS)
        try:
            if not self.connected:
                self.connect(KILL_SECONDS)
            pid = self.call("guest-exec", {"path": "/bin/sh", "arg": ["-c", kill_script(tag)]},
                            max(1.0, deadline.remaining()))["pid"]
            while not deadline.expired():
                if self.call("guest-exec-status", {"pid": pid}, max(1.0, deadline.remaining())).get("exited"):
                    return True
                time.sleep(0.01)
        except AgentError:
            pass
        return False

    def _reap(self, pid: int) -> dict[str, Any]:
        """The killed command's last status (its partial output), or {} if the agent has none for us."""
        deadline = Deadline(KILL_SECONDS)
        try:
            while not deadline.expired():
                status: dict[str, Any] = self.call("guest-exec-status", {"pid": pid}, max(1.0, deadline.remaining()))
                if status.get("exited"):
                    return status
                time.sleep(0.02)
        except AgentError:
            pass
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
