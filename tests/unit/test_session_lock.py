"""A session is alive while it holds its lock, in whatever pid namespace it runs (review finding M2).

The other session is a real second process in a pid namespace of its own (``unshare``): its pid means
nothing here, so before the lock the reaper, ``images prune`` and the libvirt reapers took it for dead.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_vmfixtures.images.cache import Cache
from pytest_vmfixtures.images.prune import entries_in_use
from pytest_vmfixtures.runtime import Runtime, reap, session_alive, session_lock_held

# Holds a session with one machine dir until its stdin closes.
HOLDER = """
import sys
from pathlib import Path
from pytest_vmfixtures.runtime import Runtime
rt = Runtime(Path(sys.argv[1]), "other-namespace")
rt.machine_dirs(rt.new_name("m"))
print(rt.session_id, flush=True)
sys.stdin.read()
rt.close()
"""


def _unshare() -> list[str]:
    """A new pid namespace with its own /proc: as root directly, as another user inside a user namespace."""
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is missing: scripts/bootstrap installs it")
    base = ["unshare", "--fork", "--pid", "--mount-proc", "--kill-child"]
    return base if os.getuid() == 0 else ["unshare", "--user", "--map-root-user", *base[1:]]


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, timeout=60)


@pytest.fixture
def other_namespace_session(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    cache = tmp_path / "cache"
    entry = cache / "states" / "s-0123456789abcdef"
    entry.mkdir(parents=True)
    _qemu_img("create", "-q", "-f", "qcow2", str(entry / "disk.qcow2"), "1M")
    proc = subprocess.Popen([*_unshare(), sys.executable, "-c", HOLDER, str(cache)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    session_id = proc.stdout.readline().strip()
    if not session_id:
        proc.kill()
        proc.communicate()
        pytest.fail(f"the session in a new pid namespace did not start: {proc.communicate()[1][-2000:]}")
    try:  # its guest's overlay sits on the entry
        _qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(entry / "disk.qcow2"),
                  str(cache / "run" / session_id / "m-1" / "overlay.qcow2"))
        yield session_id, proc
    finally:
        proc.kill()
        proc.communicate()  # reaps it and closes its pipes


def test_a_live_session_in_another_pid_namespace_is_not_reaped(tmp_path: Path, other_namespace_session) -> None:
    session_id, proc = other_namespace_session
    run_root = tmp_path / "cache" / "run"
    record = json.loads((run_root / session_id / "session.json").read_text())
    assert record["pid"] != proc.pid  # its pid is one of its own namespace: no proof of anything here
    mine = Runtime(tmp_path / "cache")  # reaps on start, as every session does
    try:
        assert (run_root / session_id / "m-1").is_dir()
        assert reap(run_root) == []
        assert session_lock_held(run_root / session_id) is True
        assert session_alive(run_root, session_id)  # what the libvirt domain and volume reapers ask
        assert tmp_path / "cache" / "states" / "s-0123456789abcdef" in entries_in_use(Cache(tmp_path / "cache"))
    finally:
        mine.close()


def test_the_session_is_reaped_once_its_holder_is_gone(tmp_path: Path, other_namespace_session) -> None:
    session_id, proc = other_namespace_session
    run_root = tmp_path / "cache" / "run"
    # SIGKILL the session's process itself (unshare's child): no cleanup runs. unshare exits once its
    # child has, and a process that exited has closed its files: the kernel has dropped the lock.
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(children) == 1
    os.kill(int(children[0]), signal.SIGKILL)
    proc.wait(timeout=60)
    assert session_lock_held(run_root / session_id) is False
    assert not session_alive(run_root, session_id)
    assert entries_in_use(Cache(tmp_path / "cache")) == set()
    assert reap(run_root) == [session_id]
    assert not (run_root / session_id).exists()


def test_a_closed_session_releases_its_lock_with_its_files(tmp_path: Path) -> None:
    rt = Runtime(tmp_path / "cache")
    assert session_lock_held(rt.run_dir) is True
    assert session_alive(rt.run_root, rt.session_id)
    rt.close()
    assert not rt.run_dir.exists()
    assert session_lock_held(rt.run_dir) is None


def test_libvirt_domains_carry_the_pid_namespace_in_their_client_tag() -> None:
    """Another container's domains (same hostname, other pid namespace) never match this one's reaper."""
    from pytest_vmfixtures.backends.libvirt.names import CLIENT

    inside = subprocess.run([*_unshare(), sys.executable, "-c",
                             "from pytest_vmfixtures.backends.libvirt.names import CLIENT; print(CLIENT)"],
                            capture_output=True, text=True, timeout=120)
    assert inside.returncode == 0, inside.stderr[-2000:]
    assert inside.stdout.strip() not in ("", CLIENT)


def test_the_libvirt_reaper_asks_the_sessions_lock(tmp_path: Path) -> None:
    """libvirt's own test driver (test:///default) holds the domains; the session is judged by its lock, not its pid."""
    import libvirt  # the [test] extra installs it

    from pytest_vmfixtures.backends.libvirt.connection import Host
    from pytest_vmfixtures.backends.libvirt.connection import reap as reap_domains
    from pytest_vmfixtures.backends.libvirt.names import CLIENT

    run_root = tmp_path / "run"
    session = run_root / f"{os.getppid()}-0123abcd"  # a live pid (our parent's) whose session is over
    session.mkdir(parents=True)
    lock = os.open(session / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    conn = libvirt.open("test:///default")
    name = f"vmfx-{session.name}-{CLIENT}-tiny-1"
    conn.defineXML(f"<domain type='test'><name>{name}</name><memory>1024</memory><os><type>hvm</type></os></domain>")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a session in another pid namespace holds it
        reap_domains(Host("test:///default", conn, "", ""), lambda s: session_alive(run_root, s))
        assert name in [d.name() for d in conn.listAllDomains(0)]
        fcntl.flock(lock, fcntl.LOCK_UN)  # it ended; its pid lives on (reused or never its own)
        reap_domains(Host("test:///default", conn, "", ""), lambda s: session_alive(run_root, s))
        assert name not in [d.name() for d in conn.listAllDomains(0)]
    finally:
        os.close(lock)
        for domain in conn.listAllDomains(0):
            if domain.name() == name:
                domain.undefine()
        conn.close()
