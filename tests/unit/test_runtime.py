"""runtime: private session dirs, the session record, and the reaper that cleans up after dead runs."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_vmfixtures.runtime import Runtime, _guest_mismatch, _proc_start_time, pid_alive, reap


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


def _started(argv: list[str], **kwargs: object) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, **kwargs)  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A live process of this user that is not a QEMU: the reaper must never kill it."""
    yield from _started(["sleep", "100"])


def _fake_binary(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    fake = directory / name
    shutil.copy(shutil.which("sleep") or "/bin/sleep", fake)
    return fake


@pytest.fixture
def fake_qemu(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A FAKE guest: a copy of sleep named qemu-system-x86_64, so it looks like a QEMU by its executable."""
    yield from _started([str(_fake_binary(tmp_path / "fakebin", "qemu-system-x86_64")), "100"])


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


def _stale_session(run_root: Path, pid: int, start_time: str | None, sock_dir: Path | None, tag: str = "deadbeef") -> Path:
    """A session dir as Runtime makes them (``<pid>-<8 hex>``, 0700, session.json), owned by ``pid``."""
    session = run_root / f"{pid}-{tag}"
    session.mkdir(parents=True, mode=0o700)
    meta: dict[str, object] = {"pid": pid, "start_time": start_time, "worker": "main"}
    if sock_dir is not None:
        meta["sock_dir"] = str(sock_dir)
    (session / "session.json").write_text(json.dumps(meta))
    return session


def _guest_pidfile(session: Path, machine: str, pid: int, start: str | None, exes: tuple[str, ...] = ()) -> None:
    (session / machine).mkdir()
    (session / machine / "pid").write_text(f"{pid} {start or ''}\n" + "".join(f"{e}\n" for e in exes))
    (session / machine / "console.log").write_text("booting\n")


def _dead_session(run_root: Path, sock_dir: Path | None = None, tag: str = "deadbeef") -> Path:
    return _stale_session(run_root, _dead_pid(), "1", sock_dir, tag)


def test_reap_kills_the_guests_of_a_dead_session_and_removes_its_files(
    tmp_path: Path, fake_qemu: subprocess.Popen[bytes]
) -> None:
    run_root = tmp_path / "cache" / "run"
    sock_dir = Path(tempfile.mkdtemp(prefix="vmfx-"))
    session = _dead_session(run_root, sock_dir)
    _guest_pidfile(session, "debian-12-1", fake_qemu.pid, _proc_start_time(fake_qemu.pid))

    removed = reap(run_root)

    assert removed == [session.name]
    assert fake_qemu.wait(timeout=5) == -9
    assert not session.exists()
    assert not sock_dir.exists()


def test_reap_runs_when_a_runtime_starts(tmp_path: Path, fake_qemu: subprocess.Popen[bytes]) -> None:
    run_root = tmp_path / "cache" / "run"
    session = _stale_session(run_root, _dead_pid(), None, None)
    _guest_pidfile(session, "m-1", fake_qemu.pid, _proc_start_time(fake_qemu.pid))
    rt = Runtime(tmp_path / "cache")
    try:
        assert not session.exists()
        assert fake_qemu.wait(timeout=5) == -9
        assert rt.reap() == []
    finally:
        rt.close()


def test_reap_leaves_a_live_session_alone(tmp_path: Path, sleeper: subprocess.Popen[bytes], fake_qemu: subprocess.Popen[bytes]) -> None:
    run_root = tmp_path / "cache" / "run"
    sock_dir = Path(tempfile.mkdtemp(prefix="vmfx-"))
    try:
        # owned by a live process (the sleeper stands in for another pytest run)
        session = _stale_session(run_root, sleeper.pid, _proc_start_time(sleeper.pid), sock_dir)
        _guest_pidfile(session, "m-1", fake_qemu.pid, _proc_start_time(fake_qemu.pid))
        assert reap(run_root) == []
        assert fake_qemu.poll() is None
        assert sleeper.poll() is None
        assert (session / "session.json").exists() and (session / "m-1" / "pid").exists()
        assert sock_dir.exists()
    finally:
        os.rmdir(sock_dir)


def test_reap_does_not_kill_a_process_that_reused_a_recorded_pid(
    tmp_path: Path, fake_qemu: subprocess.Popen[bytes]
) -> None:
    run_root = tmp_path / "run"
    session = _dead_session(run_root)
    _guest_pidfile(session, "m-1", fake_qemu.pid, "12345")  # the pid now names another process
    assert reap(run_root) == [session.name]
    assert fake_qemu.poll() is None
    assert not session.exists()


def test_reap_removes_a_session_with_a_pid_reused_by_another_process(tmp_path: Path) -> None:
    run_root = tmp_path / "run"
    session = _stale_session(run_root, os.getpid(), "1", None)  # our pid, another start time
    assert reap(run_root) == [session.name]
    assert not session.exists()


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
    # named like a socket dir, but not in the temp dir: not one Runtime made
    lookalike = tmp_path / "vmfx-lookalike"
    lookalike.mkdir(mode=0o700)
    (lookalike / "keep").write_text("x")
    # in the temp dir and named like one, but a symlink to a directory elsewhere
    link = Path(tempfile.gettempdir()) / f"vmfx-link{os.getpid()}"
    link.symlink_to(precious, target_is_directory=True)
    try:
        _dead_session(run_root, precious, tag="0000000a")
        _dead_session(run_root, lookalike, tag="0000000b")
        _dead_session(run_root, link, tag="0000000c")
        assert len(reap(run_root)) == 3
        assert (precious / "keep").exists()
        assert (lookalike / "keep").exists()
        assert link.is_symlink()
    finally:
        link.unlink()


def test_reap_of_a_missing_root(tmp_path: Path) -> None:
    assert reap(tmp_path / "absent") == []


# -- the reaper touches only what this plugin made, for this user ------------------------------


def test_reap_leaves_a_live_process_that_is_not_our_qemu_alone(
    tmp_path: Path, sleeper: subprocess.Popen[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    """A dead session of ours whose pid file names a live process of this user that is no QEMU."""
    run_root = tmp_path / "run"
    session = _dead_session(run_root)
    _guest_pidfile(session, "m-1", sleeper.pid, _proc_start_time(sleeper.pid))
    with caplog.at_level(logging.WARNING, logger="pytest_vmfixtures"):
        assert reap(run_root) == [session.name]  # the directory is ours: it goes
    assert sleeper.poll() is None
    assert not session.exists()
    assert f"leaving pid {sleeper.pid}" in caplog.text and "not a program this plugin starts" in caplog.text


def test_reap_leaves_a_directory_without_a_session_record_alone(
    tmp_path: Path, fake_qemu: subprocess.Popen[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    """Directories under run/ that Runtime did not make: no record, a torn one, another pid's, a foreign name."""
    run_root = tmp_path / "run"
    dead = _dead_pid()
    bare = run_root / f"{dead}-0000000a"
    bare.mkdir(parents=True)
    (bare / "data").write_text("not ours")
    _guest_pidfile(bare, "m-1", fake_qemu.pid, _proc_start_time(fake_qemu.pid))
    torn = run_root / f"{dead}-0000000b"
    torn.mkdir()
    (torn / "session.json").write_text("{ torn")
    other_pid = _stale_session(run_root, dead, "1", None, tag="0000000c")
    (other_pid / "session.json").write_text(json.dumps({"pid": dead + 1, "start_time": "1"}))
    foreign = run_root / "important"
    foreign.mkdir()
    (foreign / "session.json").write_text(json.dumps({"pid": dead, "start_time": "1"}))
    with caplog.at_level(logging.WARNING, logger="pytest_vmfixtures"):
        assert reap(run_root) == []
    assert fake_qemu.poll() is None
    assert (bare / "data").exists() and torn.exists() and other_pid.exists() and foreign.exists()
    assert "no well-formed session.json" in caplog.text and "not named like a session" in caplog.text


def test_reap_never_follows_a_symlink_out_of_the_run_root(tmp_path: Path, fake_qemu: subprocess.Popen[bytes]) -> None:
    """A symlinked session dir, machine dir or pid file pointing outside: nothing outside is read, killed or removed."""
    run_root = tmp_path / "run"
    outside = tmp_path / "outside"
    # outside, a directory that looks like a dead session of ours
    looks_like_session = _dead_session(outside, tag="0000000a")
    _guest_pidfile(looks_like_session, "m-1", fake_qemu.pid, _proc_start_time(fake_qemu.pid))
    (looks_like_session / "keep").write_text("x")
    run_root.mkdir()
    linked_session = run_root / looks_like_session.name
    linked_session.symlink_to(looks_like_session, target_is_directory=True)
    # a real dead session whose machine dir and pid file are symlinks out
    session = _dead_session(run_root, tag="0000000b")
    (session / "m-1").symlink_to(looks_like_session / "m-1", target_is_directory=True)
    (session / "m-2").mkdir()
    (session / "m-2" / "pid").symlink_to(looks_like_session / "m-1" / "pid")

    assert reap(run_root) == [session.name]

    assert fake_qemu.poll() is None
    assert not os.path.lexists(session)
    assert linked_session.is_symlink()
    assert (looks_like_session / "keep").exists() and (looks_like_session / "m-1" / "pid").exists()


def test_spawn_records_the_executables_and_the_reaper_kills_by_them(tmp_path: Path) -> None:
    """A FAKE guest binary with a name that is no qemu-system-*: recognised only by the exe spawn recorded."""
    fake = _fake_binary(tmp_path / "fakebin", "emulator")
    rt = Runtime(tmp_path / "cache", die_with_parent=False)
    files, _ = rt.machine_dirs(rt.new_name("m"))
    with open(files / "qemu.log", "wb") as stderr:
        proc = rt.spawn([str(fake), "100"], stderr, files / "pid")
    unrecorded = subprocess.Popen([str(fake), "100"])
    try:
        lines = (files / "pid").read_text().splitlines()
        assert lines == [f"{proc.pid} {_proc_start_time(proc.pid)}", os.path.realpath(fake)]
        _guest_pidfile(rt.run_dir, "m-2", unrecorded.pid, _proc_start_time(unrecorded.pid))
        # the owner dies: its record now names a dead pid, and the dir is named after it
        dead = _dead_pid()
        meta = json.loads((rt.run_dir / "session.json").read_text())
        (rt.run_dir / "session.json").write_text(json.dumps({**meta, "pid": dead, "start_time": "1"}))
        stale = rt.run_root / f"{dead}-{rt.session_id.rsplit('-', 1)[1]}"
        rt.run_dir.rename(stale)
        (stale / "lock").unlink()  # and no lock (this process lives on): a session of before locks, judged by its pid

        assert reap(rt.run_root) == [stale.name]

        assert proc.wait(timeout=5) == -9
        assert unrecorded.poll() is None
    finally:
        unrecorded.kill()
        unrecorded.wait()
        proc.kill()
        proc.wait()
        rt.close()


def test_spawn_with_the_parent_death_signal_records_setpriv_too(tmp_path: Path) -> None:
    rt = Runtime(tmp_path / "cache")
    files, _ = rt.machine_dirs(rt.new_name("m"))
    try:
        with open(files / "qemu.log", "wb") as stderr:
            proc = rt.spawn(["sleep", "100"], stderr, files / "pid")
        proc.kill()
        proc.wait()
        exes = (files / "pid").read_text().splitlines()[1:]
        assert exes == [os.path.realpath(shutil.which(p) or p) for p in ("setpriv", "sleep")]
    finally:
        rt.close()


def test_reap_kills_a_guest_whose_binary_was_replaced_while_it_ran(tmp_path: Path) -> None:
    """A FAKE qemu whose file is deleted after it started (an upgrade): /proc shows its exe as '(deleted)'."""
    fake = _fake_binary(tmp_path / "fakebin", "qemu-system-x86_64")
    for proc in _started([str(fake), "100"]):
        fake.unlink()
        session = _dead_session(tmp_path / "run")
        _guest_pidfile(session, "m-1", proc.pid, _proc_start_time(proc.pid), (str(fake),))
        assert reap(tmp_path / "run") == [session.name]
        assert proc.wait(timeout=5) == -9


def test_guest_mismatch_names_why() -> None:
    me = os.getpid()
    why = _guest_mismatch(me, _proc_start_time(me), set())
    assert why is not None and "not a program this plugin starts" in why
    assert _guest_mismatch(me, _proc_start_time(me), {os.path.realpath(sys.executable)}) is None
    assert _guest_mismatch(me, "1", {os.path.realpath(sys.executable)}) is not None
    assert _guest_mismatch(_dead_pid(), None, set()) is not None


needs_root = pytest.mark.skipif(os.getuid() != 0, reason="making another user's process and files needs root")
NOBODY = 65534


@needs_root
def test_reap_leaves_another_users_qemu_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A FAKE qemu (a copy of sleep) running as nobody, named by a dead session's pid file of ours."""
    bindir = Path(tempfile.mkdtemp(prefix="fakeqemu-"))  # reachable by nobody, unlike tmp_path
    try:
        bindir.chmod(0o755)
        fake = _fake_binary(bindir, "qemu-system-x86_64")
        for proc in _started([str(fake), "100"], user=NOBODY):
            session = _dead_session(tmp_path / "run")
            _guest_pidfile(session, "m-1", proc.pid, _proc_start_time(proc.pid))
            with caplog.at_level(logging.WARNING, logger="pytest_vmfixtures"):
                assert reap(tmp_path / "run") == [session.name]
            assert proc.poll() is None
            assert f"runs as uid {NOBODY}/{NOBODY}" in caplog.text
    finally:
        shutil.rmtree(bindir)


@needs_root
def test_reap_leaves_another_users_session_dir_alone(tmp_path: Path) -> None:
    run_root = tmp_path / "run"
    session = _dead_session(run_root)
    os.chown(session, NOBODY, NOBODY)
    other_record = _dead_session(run_root, tag="0000000b")
    os.chown(other_record / "session.json", NOBODY, NOBODY)
    assert reap(run_root) == []
    assert (session / "session.json").exists() and (other_record / "session.json").exists()
