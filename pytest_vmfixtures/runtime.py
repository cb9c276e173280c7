"""Where a session keeps its live files, how it starts processes, and the reaper.

A session owns two private (0700) directories: one under the cache for
overlays and logs (they can grow large), and one short one under the temp dir
for unix sockets (their paths must stay under 108 bytes). ``session.json``
records the owning pid; the reaper removes the files and kills the guests of
sessions whose owner is gone, and never touches a live session's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

log = logging.getLogger("pytest_vmfixtures")


def _proc_start_time(pid: int) -> str | None:
    """The process's start time in clock ticks: a pid plus this names one process, even after pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def pid_alive(pid: int, start_time: str | None) -> bool:
    current = _proc_start_time(pid)
    return current is not None and (start_time is None or current == start_time)


class Runtime:
    def __init__(self, cache_dir: Path, worker: str = "main", die_with_parent: bool = True) -> None:
        self.die_with_parent = die_with_parent
        self.session_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.run_root = cache_dir / "run"
        self.run_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.reap()
        self.sock_dir = Path(tempfile.mkdtemp(prefix="vmfx-"))  # mkdtemp makes it 0700
        self.worker = worker
        # The record is in place before the directory gets its final name, so a
        # concurrent reaper never sees a live session without an owner.
        staging = self.run_root / f".new-{self.session_id}"
        staging.mkdir(mode=0o700)
        (staging / "session.json").write_text(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "start_time": _proc_start_time(os.getpid()),
                    "sock_dir": str(self.sock_dir),
                    "worker": worker,
                }
            )
        )
        self.run_dir = self.run_root / self.session_id
        staging.rename(self.run_dir)
        self._counter = 0
        self._lock = threading.Lock()
        # Processes are started from one long-lived thread: the parent-death
        # signal fires when the *thread* that forked exits, not the process.
        self._launcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vmfixtures-launcher")
        self._closed = False

    def new_name(self, label: str) -> str:
        with self._lock:
            self._counter += 1
            return f"{label}-{self._counter}"

    def machine_dirs(self, name: str) -> tuple[Path, Path]:
        """A private file dir and socket dir for one machine."""
        files = self.run_dir / name
        socks = self.sock_dir / str(self._counter_for(name))
        for d in (files, socks):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        return files, socks

    @staticmethod
    def _counter_for(name: str) -> str:
        return name.rsplit("-", 1)[-1]

    def spawn(self, argv: Sequence[str], stderr: IO[bytes], pidfile: Path) -> subprocess.Popen[bytes]:
        """Start a guest process that dies with us (parent-death signal, own process group)."""
        full = ["setpriv", "--pdeathsig", "KILL", "--", *argv] if self.die_with_parent else list(argv)

        def start() -> subprocess.Popen[bytes]:
            proc = subprocess.Popen(
                full,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
                close_fds=True,
            )
            pidfile.write_text(f"{proc.pid} {_proc_start_time(proc.pid) or ''}\n")
            return proc

        return self._launcher.submit(start).result()

    def close(self) -> None:
        """Remove the session's files; the owner stops its guests first."""
        if self._closed:
            return
        self._closed = True
        self._launcher.shutdown(wait=False)
        for d in (self.run_dir, self.sock_dir):
            shutil.rmtree(d, ignore_errors=True)

    def reap(self) -> list[str]:
        """Clean up after sessions whose owning process is gone. Returns what was removed."""
        return reap(self.run_root)


def reap(run_root: Path) -> list[str]:
    removed: list[str] = []
    if not run_root.is_dir():
        return removed
    for session in sorted(run_root.iterdir()):
        if session.name.startswith("."):
            continue  # still being set up by its owner
        try:
            meta = json.loads((session / "session.json").read_text())
        except (OSError, ValueError):
            meta = {}
        if pid_alive(int(meta.get("pid", 0)), meta.get("start_time")):
            continue
        _kill_pids(session)
        sock_dir = meta.get("sock_dir")
        if sock_dir and Path(sock_dir).name.startswith("vmfx-"):
            shutil.rmtree(sock_dir, ignore_errors=True)
        shutil.rmtree(session, ignore_errors=True)
        removed.append(session.name)
    if removed:
        log.info("reaped stale sessions: %s", ", ".join(removed))
    return removed


def _kill_pids(session: Path) -> None:
    for pidfile in session.glob("*/pid"):
        try:
            pid_text, _, start = pidfile.read_text().partition(" ")
            pid = int(pid_text)
        except (OSError, ValueError):
            continue
        if pid_alive(pid, start.strip() or None):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
