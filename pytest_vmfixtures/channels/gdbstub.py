"""The few GDB remote-protocol exchanges the plugin needs: read and write guest-physical memory.

QEMU's gdbstub is the only interface that writes a device register the way
the guest would (QMP has no memory write). It is used for one repair only:
re-writing the RISC-V timer compare registers after a restore, see
:mod:`pytest_vmfixtures.backends.qemu.riscv`. Attaching stops the guest and
detaching lets it run again, as with gdb. Every exchange has a deadline.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from ..errors import GuestError

DEFAULT_TIMEOUT = 10.0


def frame(payload: str) -> bytes:
    """``$payload#checksum``: the checksum is the payload's byte sum modulo 256, in hex."""
    return f"${payload}#{sum(payload.encode()) % 256:02x}".encode()


class GdbStub:
    """A connected client; use as a context manager (detaching on exit)."""

    def __init__(self, path: Path, name: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.name = name
        self._deadline = time.monotonic() + timeout
        self._buffer = b""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(str(path))
        except OSError as exc:
            self._sock.close()
            raise GuestError(f"{name}: cannot reach QEMU's gdbstub at {path}: {exc}") from exc
        # Attaching stops the guest, and a running guest's stop is reported unasked: asking for the
        # stop reason first takes that report (or this answer) off the line before any real request.
        self.request("?")
        self._drain()

    def __enter__(self) -> GdbStub:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.request("D")  # detach: the guest runs on
        except GuestError:
            pass
        finally:
            self._sock.close()

    def request(self, payload: str) -> str:
        """Send one packet and return the reply's payload."""
        try:
            self._sock.settimeout(max(0.01, self._deadline - time.monotonic()))
            self._sock.sendall(frame(payload))
            while True:
                reply = self._packet()
                if reply is not None:
                    self._sock.sendall(b"+")
                    return reply
        except (OSError, TimeoutError) as exc:
            raise GuestError(f"{self.name}: gdbstub did not answer {payload[:20]!r}: {exc}") from exc

    def _drain(self) -> None:
        """Drop a stop report that arrived after the answer to ``?`` (it may come either side of it)."""
        self._sock.settimeout(0.2)
        try:
            while True:
                chunk = self._sock.recv(4096)
                if not chunk:
                    break
                self._buffer += chunk
        except (OSError, TimeoutError):
            pass
        if b"$" in self._buffer:
            self._sock.sendall(b"+")
        self._buffer = b""

    def _packet(self) -> str | None:
        """The next complete ``$...#xx`` packet; acks ('+') and notifications are skipped."""
        while True:
            start = self._buffer.find(b"$")
            end = self._buffer.find(b"#", start + 1) if start >= 0 else -1
            if start >= 0 and end >= 0 and len(self._buffer) >= end + 3:
                payload = self._buffer[start + 1:end].decode("ascii", "replace")
                self._buffer = self._buffer[end + 3:]
                return payload
            chunk = self._sock.recv(4096)
            if not chunk:
                raise OSError("the gdbstub closed the connection")
            self._buffer += chunk

    def physical(self) -> None:
        """Make memory accesses physical (QEMU's own extension), whatever the guest's MMU does."""
        reply = self.request("Qqemu.PhyMemMode:1")
        if reply != "OK":
            raise GuestError(f"{self.name}: this QEMU's gdbstub has no physical memory mode (it said {reply!r})")

    def read(self, address: int, size: int) -> bytes:
        reply = self.request(f"m{address:x},{size:x}")
        if reply.startswith("E") or len(reply) != 2 * size:
            raise GuestError(f"{self.name}: reading {size} bytes at {address:#x} failed: {reply}")
        return bytes.fromhex(reply)

    def write(self, address: int, data: bytes) -> None:
        reply = self.request(f"M{address:x},{len(data):x}:{data.hex()}")
        if reply != "OK":
            raise GuestError(f"{self.name}: writing {len(data)} bytes at {address:#x} failed: {reply}")
