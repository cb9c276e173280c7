"""vmfx-runner: the command runner your own images' guests keep resident, for images without qemu-guest-agent.

This file runs inside the guest, under the guest's own Python 3 (cloud-init is
written in Python, so every image it sets up has one), with the standard
library only, from Python 3.7 on. The NoCloud seed writes it to the guest and starts it as root
(channels/runner.py has the seed's part). It reads requests from a
virtio-serial port of ours (:data:`PORT_NAME`) and speaks the subset of
qemu-guest-agent's protocol that ``vm.run`` uses (``guest-sync-delimited``,
``guest-ping``, ``guest-exec``, ``guest-exec-status``, ``guest-info``), so the
host drives it with the agent's client: the same commands, environment, kill
and output caps.

Nothing listens on a network: the port is the only way in, and its device is
root's alone. While no host is connected a read returns at once (end of file);
the runner then blocks in a write, which the port holds until a host connects
(nothing is lost: the host's client discards what precedes its sync reply), so
an idle runner never wakes, and one restored from a saved state answers at once.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

PORT_NAME = "org.pytest_vmfixtures.runner.0"
VERSION = "1"
SYNC = b"\xff"  # the host sends it to drop a half-read request; it precedes our reply to guest-sync-delimited
MAX_OUTPUT = 16 << 20  # per stream, as qemu-guest-agent's guest-exec; past it the output is cut and marked truncated
MAX_REQUEST = 64 << 20  # a request without a newline past this is garbage: dropped
MAX_JOBS = 1024  # commands whose status nobody collected; past it the oldest finished ones are forgotten
COMMANDS = ("guest-sync-delimited", "guest-sync", "guest-ping", "guest-info", "guest-exec", "guest-exec-status")


def frames(buffer: bytes) -> tuple[list[bytes], bytes]:
    """The complete requests in ``buffer`` and what is left of it.

    A 0xff byte (never part of UTF-8 JSON) discards everything before it. A
    request is one line; a partial line past MAX_REQUEST is dropped.
    """
    if SYNC in buffer:
        buffer = buffer.rsplit(SYNC, 1)[1]
    *lines, rest = buffer.split(b"\n")
    if len(rest) > MAX_REQUEST:
        rest = b""
    return [line for line in lines if line.strip()], rest


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def error(kind: str, desc: str) -> dict[str, Any]:
    return {"error": {"class": kind, "desc": desc}}


class Job:
    """One command started by ``guest-exec``: its process and the output gathered so far."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self.output: dict[str, bytearray] = {"out": bytearray(), "err": bytearray()}
        self.truncated: dict[str, bool] = {"out": False, "err": False}
        self.readers = [threading.Thread(target=self._drain, args=(stream, key), daemon=True)
                        for stream, key in ((process.stdout, "out"), (process.stderr, "err")) if stream is not None]
        for reader in self.readers:
            reader.start()

    def _drain(self, stream: IO[bytes], key: str) -> None:
        with stream:
            while True:  # no walrus: the guest's Python may be 3.7
                chunk = os.read(stream.fileno(), 65536)
                if not chunk:
                    return
                room = MAX_OUTPUT - len(self.output[key])
                if len(chunk) > room:
                    self.truncated[key] = True
                self.output[key] += chunk[: max(room, 0)]

    def status(self) -> dict[str, Any] | None:
        """Its final status (as guest-exec-status reports one), or None while it runs or its output is unread."""
        code = self.process.poll()
        if code is None or any(reader.is_alive() for reader in self.readers):
            return None
        status: dict[str, Any] = {"exited": True}
        if code < 0:
            status["signal"] = -code
        else:
            status["exitcode"] = code
        for key in ("out", "err"):
            if self.output[key]:
                status[f"{key}-data"] = base64.b64encode(bytes(self.output[key])).decode("ascii")
            if self.truncated[key]:
                status[f"{key}-truncated"] = True
        return status


class Runner:
    """Answers requests; the commands it starts run as its own user (root), each in a session of its own."""

    def __init__(self) -> None:
        self.jobs: dict[int, Job] = {}

    def reply(self, line: bytes) -> bytes:
        """The reply to one request line (an error reply for one it cannot read or does not know)."""
        try:
            request = json.loads(line)
        except ValueError as exc:
            return encode(error("GenericError", f"invalid JSON: {exc}"))
        if not isinstance(request, dict) or not isinstance(request.get("execute"), str):
            return encode(error("GenericError", "a request is an object with 'execute'"))
        command, arguments = request["execute"], request.get("arguments") or {}
        if not isinstance(arguments, dict):
            return encode(error("GenericError", "'arguments' must be an object"))
        try:
            if command == "guest-sync-delimited":
                return SYNC + encode({"return": arguments.get("id")})
            if command == "guest-sync":
                return encode({"return": arguments.get("id")})
            if command == "guest-ping":
                return encode({"return": {}})
            if command == "guest-info":
                return encode({"return": {"version": f"vmfx-runner {VERSION}",
                                          "supported_commands": [{"name": c, "enabled": True} for c in COMMANDS]}})
            if command == "guest-exec":
                return encode({"return": {"pid": self.start(arguments)}})
            if command == "guest-exec-status":
                return encode({"return": self.status(arguments)})
        except (OSError, ValueError, TypeError, KeyError) as exc:
            return encode(error("GenericError", f"{command}: {exc}"))
        return encode(error("CommandNotFound", f"The command {command} has not been found"))

    def start(self, arguments: dict[str, Any]) -> int:
        path, args = arguments["path"], arguments.get("arg") or []
        env_list = arguments.get("env")
        env = dict(item.split("=", 1) for item in env_list if "=" in item) if env_list is not None else None
        data = base64.b64decode(arguments["input-data"]) if arguments.get("input-data") else None
        capture = bool(arguments.get("capture-output"))
        process = subprocess.Popen(
            [str(path), *(str(a) for a in args)], env=env, cwd="/", start_new_session=True,
            stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
            stderr=subprocess.PIPE if capture else subprocess.DEVNULL,
        )
        if data is not None and process.stdin is not None:
            threading.Thread(target=_feed, args=(process.stdin, data), daemon=True).start()
        self._forget_old()
        self.jobs[process.pid] = Job(process)
        return process.pid

    def status(self, arguments: dict[str, Any]) -> dict[str, Any]:
        pid = arguments.get("pid")
        job = self.jobs.get(pid) if isinstance(pid, int) else None
        if job is None:
            raise ValueError(f"Invalid parameter 'pid': no command {pid!r} of ours")
        status = job.status()
        if status is None:
            return {"exited": False}
        del self.jobs[job.process.pid]  # reported once, as the agent does
        return status

    def _forget_old(self) -> None:
        finished = [pid for pid, job in self.jobs.items() if job.process.poll() is not None]
        while len(self.jobs) >= MAX_JOBS and finished:
            del self.jobs[finished.pop(0)]


def _feed(stdin: IO[bytes], data: bytes) -> None:
    try:
        with stdin:
            stdin.write(data)
    except OSError:
        pass  # the command ended without reading it all


def find_port(name: str = PORT_NAME, sysfs: Path = Path("/sys/class/virtio-ports")) -> Path | None:
    """The device of the virtio-serial port called ``name`` (found in sysfs: no udev symlink needed)."""
    for entry in sorted(sysfs.glob("*")):
        try:
            if (entry / "name").read_text().strip() == name:
                return Path("/dev") / entry.name
        except OSError:
            continue
    return None


def wait_for_host(fd: int) -> None:
    """No host is connected: wait in a write, which the port holds until one is (the host skips the newline)."""
    _write_all(fd, b"\n")


def serve(fd: int, runner: Runner, idle: Callable[[int], None] = wait_for_host) -> None:
    """Answer requests on the port ``fd`` for ever; ``idle`` is called when a read finds no host."""
    buffer = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            buffer = b""
            idle(fd)
            continue
        lines, buffer = frames(buffer + chunk)
        for line in lines:
            _write_all(fd, runner.reply(line))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def main() -> int:
    os.umask(0o077)
    os.chdir("/")
    for _ in range(600):  # the port is there from boot; a slow udev or sysfs gets a minute
        port = find_port()
        if port is not None:
            break
        time.sleep(0.1)
    else:
        print(f"vmfx-runner: no virtio-serial port named {PORT_NAME}", file=sys.stderr)
        return 1
    fd = os.open(port, os.O_RDWR | os.O_CLOEXEC)
    serve(fd, Runner())
    return 0


if __name__ == "__main__":
    sys.exit(main())
