"""runtime: private session dirs, the session record, and the reaper that cleans up after dead runs."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_vmfixtures.runtime import Runtime, _proc_start_time, pid_alive, reap


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    rt = Runtime(tmp_path / "cache", worker="gw3")
    try:
        yield rt
    finally:
        rt.close()


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "100"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_runtime_dirs_are_private(runtime: Runtime, tmp_path: Path) -> None:
    assert runtime.run_root == tmp_path / "cache" / "run"
    assert runtime.run_dir.parent == runtime.run_root
    assert _mode(runtime.run_root) == 0o700
    assert _mode(runtime.run_dir) == 0o700
    assert _mode(runtime.sock_dir) == 0o700
    assert runtime.sock_dir.name.startswith("vmfx-")
    assert runtime.sock_dir.parent == Path(tempfile.gettempdir())
    files, socks = runtime.machine_dirs(runtime.new_name("debian-12"))
    assert files.parent == runtime.run_dir and socks.parent == runtime.sock_dir
    assert _mode(files) == 0o700 and _mode(socks) == 0o700


def test_socket_paths_stay_short(runtime: Runtime) -> None:
    _, socks = runtime.machine_dirs(runtime.new_name("a-very-long-image-name-for-a-recipe-1.2.3"))
    assert len(str(socks / "qga").encode()) < 108


def test_session_record(runtime: Runtime) -> None:
    meta = json.loads((runtime.run_dir / "session.json").read_text())
    assert meta == {
        "pid": os.getpid(),
        "start_time": _proc_start_time(os.getpid()),
        "sock_dir": str(runtime.sock_dir),
        "worker": "gw3",
    }
    assert runtime.run_dir.name == runtime.session_id
    assert not [p for p in runtime.run_root.iterdir() if p.name.startswith(".new-")]


def test_new_names_are_unique_per_session(runtime: Runtime) -> None:
    names = [runtime.new_name("debian-12") for _ in range(3)] + [runtime.new_name("alpine")]
    assert names == ["debian-12-1", "debian-12-2", "debian-12-3", "alpine-4"]
    dirs = {runtime.machine_dirs(n) for n in names}
    assert len({files for files, _ in dirs}) == 4
    assert len({socks for _, socks in dirs}) == 4


def test_close_removes_the_session_and_is_idempotent(tmp_path: Path) -> None:
    rt = Runtime(tmp_path / "cache")
    run_dir, sock_dir = rt.run_dir, rt.sock_dir
    rt.machine_dirs(rt.new_name("x"))
    rt.close()
    rt.close()
    assert not run_dir.exists()
    assert not sock_dir.exists()
    assert rt.run_root.exists()


def test_two_sessions_share_the_run_root_without_reaping_each_other(tmp_path: Path) -> None:
    first = Runtime(tmp_path / "cache")
    second = Runtime(tmp_path / "cache")
    try:
        assert first.run_dir != second.run_dir
        assert first.run_dir.exists() and second.run_dir.exists()
        assert reap(first.run_root) == []
    finally:
        first.close()
        second.close()


def test_pid_alive() -> None:
    me = os.getpid()
    assert pid_alive(me, _proc_start_time(me))
    assert pid_alive(me, None)
    assert not pid_alive(me, "1")  # same pid, other start time: a reused pid
    assert not pid_alive(_dead_pid(), None)
    assert _proc_start_time(_dead_pid()) is None


def _stale_session(run_root: Path, name: str, pid: int, start_time: str | None, sock_dir: Path | None) -> Path:
    session = run_root / name
    session.mkdir(parents=True)
    meta: dict[str, object] = {"pid": pid, "start_time": start_time, "worker": "main"}
    if sock_dir is not None:
        meta["sock_dir"] = str(sock_dir)
    (session / "session.json").write_text(json.dumps(meta))
    return session


def _guest_pidfile(session: Path, machine: str, pid: int, start: str | None) -> None:
    (session / machine).mkdir()
    (session / machine / "pid").write_text(f"{pid} {start or ''}\n")
    (session / machine / "console.log").write_text("booting\n")


def test_reap_kills_the_guests_of_a_dead_session_and_removes_its_files(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    run_root = tmp_path / "cache" / "run"
    sock_dir = Path(tempfile.mkdtemp(prefix="vmfx-"))
    session = _stale_session(run_root, "123-deadbeef", _dead_pid(), "1", sock_dir)
    _guest_pidfile(session, "debian-12-1", sleeper.pid, _proc_start_time(sleeper.pid))

    removed = reap(run_root)

    assert removed == ["123-deadbeef"]
    assert sleeper.wait(timeout=5) == -9
    assert not session.exists()
    assert not sock_dir.exists()


def test_reap_runs_when_a_runtime_starts(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    run_root = tmp_path / "cache" / "run"
    session = _stale_session(run_root, "9-old", _dead_pid(), None, None)
    _guest_pidfile(session, "m-1", sleeper.pid, _proc_start_time(sleeper.pid))
    rt = Runtime(tmp_path / "cache")
    try:
        assert not session.exists()
        assert sleeper.wait(timeout=5) == -9
        assert rt.reap() == []
    finally:
        rt.close()


def test_reap_leaves_a_live_session_alone(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    run_root = tmp_path / "cache" / "run"
    sock_dir = Path(tempfile.mkdtemp(prefix="vmfx-"))
    try:
        # owned by a live process (the sleeper stands in for another pytest run)
        session = _stale_session(run_root, "live", sleeper.pid, _proc_start_time(sleeper.pid), sock_dir)
        guest = subprocess.Popen(["sleep", "100"])
        try:
            _guest_pidfile(session, "m-1", guest.pid, _proc_start_time(guest.pid))
            assert reap(run_root) == []
            assert guest.poll() is None
            assert sleeper.poll() is None
            assert (session / "session.json").exists() and (session / "m-1" / "pid").exists()
            assert sock_dir.exists()
        finally:
            guest.kill()
            guest.wait()
    finally:
        os.rmdir(sock_dir)


def test_reap_does_not_kill_a_process_that_reused_a_recorded_pid(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    run_root = tmp_path / "run"
    session = _stale_session(run_root, "dead", _dead_pid(), "1", None)
    _guest_pidfile(session, "m-1", sleeper.pid, "12345")  # the pid now names another process
    assert reap(run_root) == ["dead"]
    assert sleeper.poll() is None
    assert not session.exists()


def test_reap_removes_a_session_with_a_pid_reused_by_another_process(tmp_path: Path) -> None:
    run_root = tmp_path / "run"
    session = _stale_session(run_root, "reused", os.getpid(), "1", None)  # our pid, another start time
    assert reap(run_root) == ["reused"]
    assert not session.exists()


def test_reap_removes_a_session_without_a_readable_record(tmp_path: Path) -> None:
    run_root = tmp_path / "run"
    (run_root / "broken").mkdir(parents=True)
    (run_root / "broken" / "session.json").write_text("{ torn")
    (run_root / "empty").mkdir()
    assert sorted(reap(run_root)) == ["broken", "empty"]
    assert list(run_root.iterdir()) == []


def test_reap_skips_sessions_still_being_set_up(tmp_path: Path) -> None:
    run_root = tmp_path / "run"
    staging = run_root / ".new-1-abc"
    staging.mkdir(parents=True)
    assert reap(run_root) == []
    assert staging.exists()


def test_reap_only_removes_socket_dirs_it_could_have_made(tmp_path: Path) -> None:
    run_root = tmp_path / "run"
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep").write_text("x")
    _stale_session(run_root, "dead", _dead_pid(), "1", precious)
    assert reap(run_root) == ["dead"]
    assert (precious / "keep").exists()


def test_reap_of_a_missing_root(tmp_path: Path) -> None:
    assert reap(tmp_path / "absent") == []
