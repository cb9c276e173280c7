"""A synchronous QMP handle over qemu.qmp.

qemu.qmp is asyncio; the plugin's public API is synchronous. All QMP clients
of the process share one event loop running in one daemon thread, and every
call goes through :func:`_call`, which bounds it with a timeout. Nothing else
in the plugin touches asyncio.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.error import QMPError as LibraryQMPError

from ..errors import GuestError, QMPError

T = TypeVar("T")

_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()

DEFAULT_TIMEOUT = 60.0


def _event_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _loop_lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="vmfixtures-qmp", daemon=True)
            thread.start()
            _loop = loop
        return _loop


def _call(coro: Coroutine[Any, Any, T], timeout: float) -> T:
    future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), _event_loop())
    try:
        return future.result(timeout + 5)
    except TimeoutError:
        future.cancel()
        raise


class QMP:
    """A connected QMP monitor; ``execute`` returns the command's ``return`` value."""

    def __init__(self, socket_path: Path, name: str) -> None:
        self.socket_path = socket_path
        self.name = name
        self._client = QMPClient(name)
        self._closed = False

    def connect(self, timeout: float = 10.0) -> None:
        try:
            _call(self._client.connect(str(self.socket_path)), timeout)
        except (LibraryQMPError, OSError, TimeoutError) as exc:
            raise GuestError(f"{self.name}: cannot connect to QMP at {self.socket_path}: {exc}") from exc

    def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = DEFAULT_TIMEOUT) -> Any:
        """Run one QMP command; a QMP error raises :class:`QMPError` with QEMU's words."""
        if self._closed:
            raise GuestError(f"{self.name}: QMP handle is closed (the guest was reverted or stopped)")
        try:
            return _call(self._client.execute(command, arguments), timeout)
        except ExecuteError as exc:
            raise QMPError(command, exc.error.error.class_, exc.error.error.desc) from exc
        except TimeoutError as exc:
            raise GuestError(f"{self.name}: QMP {command!r} did not answer within {timeout:g} s") from exc
        except (LibraryQMPError, OSError, EOFError) as exc:
            raise GuestError(f"{self.name}: QMP connection lost during {command!r}: {exc}") from exc

    def human(self, command_line: str, timeout: float = DEFAULT_TIMEOUT) -> str:
        """Run an HMP command (savevm, loadvm, ...); its text output is its only error channel."""
        out = self.execute("human-monitor-command", {"command-line": command_line}, timeout)
        return str(out)

    def send_fd(self, fd: int, fdname: str) -> None:
        """Hand QEMU an open file (SCM_RIGHTS), so QEMU never opens our paths itself."""

        async def send() -> None:
            self._client.send_fd_scm(fd)
            await self._client.execute("getfd", {"fdname": fdname})

        try:
            _call(send(), 10.0)
        except ExecuteError as exc:
            raise QMPError("getfd", exc.error.error.class_, exc.error.error.desc) from exc
        except TimeoutError as exc:
            raise GuestError(f"{self.name}: QEMU did not take the file {fdname!r} within 10 s") from exc

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            _call(self._client.disconnect(), 5.0)
        except Exception:  # the peer may already be gone; closing must not fail
            pass
