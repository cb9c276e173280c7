"""Two pytest runs with two workers each share one cache; one run is in a pid namespace of its own.

The state they restore is made to fail its first restore (its RAM stream replaced with garbage, the
manifest rewritten to match, as after a QEMU change the cache key did not capture). Every test of both
runs passes, one cold boot makes the state again (findings M1: workers no longer delete each other's new
state), and while both run a third run starts on the cache and reaps: nothing of either run is removed
(finding M2: the other namespace's sessions are live by their lock, though their pids mean nothing here).
The ``tiny`` image: its boot takes seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_vmfixtures.fixtures import SESSION_KEY
from pytest_vmfixtures.images.cache import Cache, ensure_image
from pytest_vmfixtures.images.catalog import BUILTIN_IMAGES_DIR

CONFTEST = '''
import os
from pathlib import Path

def pytest_vm_provision(vm):  # runs once per cold boot of a state: the count of boots
    with open(Path(os.environ["SHARED_SYNC"]) / "boots", "a") as f:
        f.write(os.environ["SHARED_RUN"] + "\\n")
'''

SUITE = '''
import os
import time
from pathlib import Path

SYNC = Path(os.environ["SHARED_SYNC"])
RUN = os.environ["SHARED_RUN"]


def _wait_for(pattern):
    deadline = time.monotonic() + 900
    while not list(SYNC.glob(pattern)):
        assert time.monotonic() < deadline, f"{RUN}: never saw {pattern} in {SYNC}"
        time.sleep(0.5)


def _check(vm, n):
    assert vm.run("true").ok
    if RUN not in ("A", "B"):
        return
    (SYNC / f"{RUN}-{n}-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}").write_text(str(vm.console_log))
    _wait_for("B-*" if RUN == "A" else "A-*")  # both runs hold guests now
    _wait_for("third-done")  # and a third run has started on the cache and reaped
    assert vm.console_log.exists(), f"{RUN}: {vm.console_log} was removed under this run"
    assert vm.run("echo still-here").stdout == "still-here\\n"


def test_one(vm):
    _check(vm, 1)


def test_two(vm):
    _check(vm, 2)
'''


def _in_own_pid_namespace() -> list[str]:
    """A new pid namespace with its own /proc: as root directly, as another user inside a user namespace."""
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is missing: scripts/bootstrap installs it")
    base = ["unshare", "--fork", "--pid", "--mount-proc", "--kill-child"]
    return base if os.getuid() == 0 else ["unshare", "--user", "--map-root-user", *base[1:]]


def _break(state: Path) -> str:
    """Make the state fail to load while its digests match; returns the manifest time of the broken making."""
    memory = state / "memory"
    memory.chmod(0o600)
    memory.write_bytes(b"not a migration stream" * 100)
    cache = Cache(state.parent.parent)
    manifest = cache.read_manifest(state)
    cache.write_manifest(state, {k: v for k, v in manifest.items() if k not in ("files", "created")}, ["disk.qcow2", "memory"])
    return repr(cache.read_manifest(state)["created"])


def test_two_xdist_runs_one_in_another_pid_namespace_share_a_state_that_fails(
    tmp_path: Path, request: pytest.FixtureRequest,
) -> None:
    outer = request.config.stash[SESSION_KEY].settings.cache_dir
    image = ensure_image(Cache(outer), "tiny", [BUILTIN_IMAGES_DIR], lambda m: None)
    cache = tmp_path / "cache"
    shutil.copytree(image.directory, cache / "images" / image.directory.name)  # no build here: the image is not the point
    suite, sync = tmp_path / "suite", tmp_path / "sync"
    suite.mkdir()
    sync.mkdir()
    (suite / "conftest.py").write_text(CONFTEST)
    (suite / "test_shared.py").write_text(SUITE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VMFIX_"))}
    args = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", f"--vm-cache={cache}", "--vm-image=tiny"]
    logs: dict[str, Path] = {}

    def start(run: str, *extra: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
        logs[run] = tmp_path / f"{run}.log"
        with open(logs[run], "wb") as out:
            return subprocess.Popen([*prefix, *args, *extra, str(suite)], cwd=suite, env={**env, "SHARED_SYNC": str(sync),
                                    "SHARED_RUN": run}, stdout=out, stderr=subprocess.STDOUT)

    def finish(run: str, proc: subprocess.Popen[bytes]) -> None:
        assert proc.wait(900) == 0, f"run {run}:\n" + logs[run].read_text(errors="replace")[-4000:]

    finish("warm", start("warm", "-p", "no:xdist", "-k", "test_one"))
    (state,) = (cache / "states").iterdir()
    broken = _break(state)

    runs = {"A": start("A", "-n", "2", prefix=tuple(_in_own_pid_namespace())), "B": start("B", "-n", "2")}
    try:
        deadline = time.monotonic() + 900
        while not (list(sync.glob("A-*")) and list(sync.glob("B-*"))):
            for run, proc in runs.items():
                assert proc.poll() is None, f"run {run} ended early:\n" + logs[run].read_text(errors="replace")[-4000:]
            assert time.monotonic() < deadline, "the two runs never both held a guest"
            time.sleep(0.5)
        finish("third", start("third", "-p", "no:xdist", "-k", "test_one"))  # its session reaps on start
        (sync / "third-done").write_text("")
        for run, proc in runs.items():
            finish(run, proc)
    finally:
        for proc in runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert (sync / "boots").read_text().split() in (["warm", "A"], ["warm", "B"])  # one cold boot made it again
    (remade,) = (cache / "states").iterdir()
    assert repr(Cache.read_manifest(remade)["created"]) != broken
    assert Cache.check_manifest(remade) is None
    assert list((cache / "run").iterdir()) == []  # each run removed its own files, and only those
