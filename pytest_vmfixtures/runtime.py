"""Where a session keeps its live files, how it starts processes, and the reaper.

A session owns two private (0700) directories: one under the cache for
overlays and logs (they can grow large), and one short one under the temp dir
for unix sockets (their paths must stay under 108 bytes). ``session.json``
records the owning pid; the session holds an exclusive ``flock`` on its
``lock`` file for its whole life. The reaper removes the files and kills the
guests of sessions whose lock is free (the owner is gone: the kernel drops a
flock with its holder), and never touches a live session's. A pid alone is
not proof: a session in another pid namespace (another container sharing the
cache) has a pid this one cannot see, but its lock is held all the same.
Sessions made before the lock existed are judged by their pid, as before.

The reaper acts only on what this plugin made, for this user: a session dir
under ``run/`` is removed only if it is a real directory (not a symlink) owned
by us, named like ``Runtime`` names them, with a well-formed ``session.json``
of ours; a socket dir only if it is our 0700 ``vmfx-*`` directory in the temp
dir; and a pid from a pid file is killed only if that process is ours (uid),
is the one recorded (start time) and runs the program ``spawn`` started (a
``qemu-system-*`` binary or the executable recorded at spawn time). Anything
else is left alone, and the log says why.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, NamedTuple

log = logging.getLogger("pytest_vmfixtures")

# What Runtime names its directories (``<pid>-<8 hex>``, ``vmfx-<mkdtemp suffix>``) and what spawn starts.
SESSION_NAME = re.compile(r"(\d+)-[0-9a-f]{8}")
SOCK_DIR_NAME = re.compile(r"vmfx-[A-Za-z0-9_]+")
QEMU_EXE_NAME = re.compile(r"qemu-system-[A-Za-z0-9_.+-]+")
MAX_RECORD_BYTES = 64 * 1024
SESSION_LOCK = "lock"  # in run/<session>/: held (flock, exclusive) by the session for its whole life
USES = "uses"  # in run/<session>/: cache files the session uses, one path a line (images prune keeps them)


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
        self.cache_dir = cache_dir
        self.run_root = cache_dir / "run"
        self.run_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.reap()
        self.sock_dir = Path(tempfile.mkdtemp(prefix="vmfx-"))  # mkdtemp makes it 0700
        self.worker = worker
        # The record is in place before the directory gets its final name, so a
        # concurrent reaper never sees a live session without an owner.
        staging = self.run_root / f".new-{self.session_id}"
        staging.mkdir(mode=0o700)
        # The lock is taken before the directory gets its final name: no reaper ever sees it free.
        self._lock_fd = os.open(staging / SESSION_LOCK, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
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
        self._uses: set[str] = set()
        # Processes are started from one long-lived thread: the parent-death
        # signal fires when the *thread* that forked exits, not the process.
        self._launcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vmfixtures-launcher")
        self._closed = False

    def new_name(self, label: str) -> str:
        with self._lock:
            self._counter += 1
            return f"{label}-{self._counter}"

    def record_use(self, *paths: Path) -> None:
        """Note cache files this session uses (images, seeds, states): ``images prune`` keeps their entries
        while the session lives, whether or not a guest of it is running at that moment."""
        with self._lock:
            new = [str(p) for p in paths if "\n" not in str(p) and str(p) not in self._uses]
            if not new or self._closed:
                return
            self._uses.update(new)
            with open(self.run_dir / USES, "a", encoding="utf-8") as f:
                f.write("".join(f"{p}\n" for p in new))

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

    def spawn(
        self, argv: Sequence[str], stderr: IO[bytes], pidfile: Path, pass_fds: Sequence[int] = (),
    ) -> subprocess.Popen[bytes]:
        """Start a guest process that dies with us (parent-death signal, own process group); it inherits
        ``pass_fds`` and no other descriptor of ours."""
        full = ["setpriv", "--pdeathsig", "KILL", "--", *argv] if self.die_with_parent else list(argv)
        # The pid file names the executables the process may be running (setpriv until it execs the
        # guest's binary), so that the reaper kills a recorded pid only if it still runs one of them
        # (or a qemu-system-* binary: pid files written before they listed executables).
        exes = [exe for exe in (_resolve_exe(full[0]), _resolve_exe(argv[0])) if exe]
        record = "".join(f"{exe}\n" for exe in dict.fromkeys(exes))

        def start() -> subprocess.Popen[bytes]:
            proc = subprocess.Popen(
                full,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
                close_fds=True,
                pass_fds=tuple(pass_fds),
            )
            pidfile.write_text(f"{proc.pid} {_proc_start_time(proc.pid) or ''}\n{record}")
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
        os.close(self._lock_fd)  # last: the session counts as live until its files are gone

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
        record = _session_record(session)
        if record is None or _record_alive(session, record):
            continue
        _kill_pids(session)
        if record.sock_dir and _is_our_sock_dir(Path(record.sock_dir)):
            shutil.rmtree(record.sock_dir, ignore_errors=True)
        # rmtree never follows symlinks: it refuses a symlink given to it and unlinks those inside.
        shutil.rmtree(session, ignore_errors=True)
        if os.path.lexists(session):
            log.warning("reaper: could not remove all of %s", session)
        removed.append(session.name)
    if removed:
        log.info("reaped stale sessions: %s", ", ".join(removed))
    return removed


def session_lock_held(session: Path) -> bool | None:
    """Whether the session dir's lock is held by a live process; None if it has no lock (made before locks)."""
    try:
        fd = os.open(session / SESSION_LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError:
        return True  # cannot tell: never reap what may be live
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's own shared lock
    return False


def _record_alive(session: Path, record: SessionRecord) -> bool:
    held = session_lock_held(session)
    return pid_alive(record.pid, record.start_time) if held is None else held


def session_alive(run_root: Path, session_id: str) -> bool:
    """Whether the session ``session_id`` (a ``<pid>-<hex>`` name, as in libvirt domain names) still runs.

    Its lock decides when its directory is in ``run_root``; otherwise (reaped already, closed, or a
    session of another cache) only the pid can tell, which callers limit to their own pid namespace.
    """
    match = SESSION_NAME.fullmatch(session_id)
    if match is None:
        return True
    held = session_lock_held(run_root / session_id)
    return pid_alive(int(match.group(1)), None) if held is None else held


def _resolve_exe(program: str) -> str | None:
    """The file the kernel will show as /proc/<pid>/exe for ``program`` (symlinks resolved)."""
    found = shutil.which(program)
    if found is None or "\n" in found:
        return None
    return os.path.realpath(found)


def _read_own_file(name: str, dir_fd: int) -> str | None:
    """A regular file of ours in ``dir_fd``, not through a symlink; None if it is anything else."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size > MAX_RECORD_BYTES:
            return None
        return os.read(fd, MAX_RECORD_BYTES).decode("utf-8", errors="replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def _open_own_dir(path: str | Path, dir_fd: int | None = None) -> int | None:
    """An fd for a real directory (not a symlink) owned by us, or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_uid == os.getuid():
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


class SessionRecord(NamedTuple):
    pid: int
    start_time: str | None
    sock_dir: str


def _session_record(session: Path) -> SessionRecord | None:
    """The session.json of a session dir Runtime made, or None (logged) for anything else under run/."""
    match = SESSION_NAME.fullmatch(session.name)
    if match is None:
        log.warning("reaper: leaving %s alone: not named like a session this plugin makes", session)
        return None
    fd = _open_own_dir(session)
    if fd is None:
        log.warning("reaper: leaving %s alone: not a directory of this user (or a symlink)", session)
        return None
    try:
        text = _read_own_file("session.json", fd)
    finally:
        os.close(fd)
    try:
        meta = json.loads(text) if text is not None else None
    except ValueError:
        meta = None
    if (
        not isinstance(meta, dict)
        or type(meta.get("pid")) is not int
        or meta["pid"] != int(match.group(1))
        or not isinstance(meta.get("start_time"), (str, type(None)))
        or not isinstance(meta.get("sock_dir", ""), str)
    ):
        log.warning("reaper: leaving %s alone: no well-formed session.json of this user in it", session)
        return None
    return SessionRecord(meta["pid"], meta["start_time"], meta.get("sock_dir", ""))


def _is_our_sock_dir(path: Path) -> bool:
    """A socket dir Runtime made: a 0700 ``vmfx-*`` directory of ours right in the temp dir, not a symlink."""
    if not (
        path.is_absolute()
        and os.path.normpath(path.parent) == os.path.normpath(tempfile.gettempdir())
        and SOCK_DIR_NAME.fullmatch(path.name)
    ):
        log.warning("reaper: leaving %s alone: not a socket directory this plugin makes", path)
        return False
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("reaper: leaving %s alone: %s", path, exc)
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        log.warning("reaper: leaving %s alone: not a private directory of this user (or a symlink)", path)
        return False
    return True


def _kill_pids(session: Path) -> None:
    session_fd = _open_own_dir(session)
    if session_fd is None:
        return
    try:
        with os.scandir(session_fd) as entries:
            machines = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
        for machine in machines:
            machine_fd = _open_own_dir(machine, dir_fd=session_fd)
            if machine_fd is None:
                continue
            try:
                text = _read_own_file("pid", machine_fd)
            finally:
                os.close(machine_fd)
            if text is not None:
                _kill_recorded(session / machine / "pid", text)
    except OSError as exc:
        log.warning("reaper: cannot look for guests in %s: %s", session, exc)
    finally:
        os.close(session_fd)


def _parse_pidfile(text: str) -> tuple[int, str | None, set[str]] | None:
    """``<pid> <start time>`` on the first line, then the executables spawn recorded, one a line."""
    first, *rest = text.split("\n")
    pid_text, _, start = first.partition(" ")
    try:
        pid = int(pid_text)
    except ValueError:
        return None
    return pid, start.strip() or None, {line for line in rest if line}


def _kill_recorded(pidfile: Path, text: str) -> None:
    parsed = _parse_pidfile(text)
    if parsed is None:
        log.warning("reaper: ignoring %s: no pid in it", pidfile)
        return
    pid, start_time, exes = parsed
    if pid <= 0:
        log.warning("reaper: ignoring %s: pid %d", pidfile, pid)
        return
    # A pidfd names one process: if the pid is reused after the checks, the signal goes nowhere.
    pidfd: int | None
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError:
        pidfd = None  # no pidfd on this kernel: the checks and the kill are apart by microseconds
    try:
        if not pid_alive(pid, start_time):
            return  # gone, or the pid names another process now: nothing of ours to stop
        why_not = _guest_mismatch(pid, start_time, exes)
        if why_not is not None:
            log.warning("reaper: leaving pid %d (from %s) alone: %s", pid, pidfile, why_not)
            return
        try:
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _guest_mismatch(pid: int, start_time: str | None, exes: set[str]) -> str | None:
    """Why ``pid`` is not a live guest process this plugin started for this user; None if it is.

    It must run as our uid (real and effective), have the recorded start time (if one is recorded),
    and run a ``qemu-system-*`` binary or one of the executables recorded when it was spawned.
    """
    if not pid_alive(pid, start_time):
        return "no such process, or another one has that pid now (its start time differs)"
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError as exc:
        return f"cannot inspect it ({exc.strerror})"
    uids = next((line.split()[1:3] for line in status.splitlines() if line.startswith("Uid:")), [])
    if uids != [str(os.getuid())] * 2:
        return f"it runs as uid {'/'.join(uids) or '?'}, not {os.getuid()}"
    exe = exe.removesuffix(" (deleted)")  # the binary was replaced (an upgrade) while it ran
    if exe not in exes and not QEMU_EXE_NAME.fullmatch(os.path.basename(exe)):
        return f"it runs {exe}, not a program this plugin starts"
    return None
