"""Faults inside guests and in the cache: panics, corrupt states, a full disk, a guest reaching for the host."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_vmfixtures.images.cache import Cache, ensure_image
from pytest_vmfixtures.images.catalog import BUILTIN_IMAGES_DIR

from .conftest import session_qemu

PANIC_CONFTEST = '''
import dataclasses
from pathlib import Path
from pytest_vmfixtures.images.cache import Cache, ensure_image
from pytest_vmfixtures.images.catalog import BUILTIN_IMAGES_DIR

def pytest_vm_image_resolve(config, name):
    if name != "panics":
        return None
    base = ensure_image(Cache(Path(config.getoption("vm_cache"))), "debian-12", [BUILTIN_IMAGES_DIR], print)
    # No initrd init and no built-in disk driver: the kernel cannot mount root and panics.
    return dataclasses.replace(base, name="panics", cmdline=base.cmdline + " rdinit=/nonexistent")
'''

PANIC_TEST = '''
import pytest
from pytest_vmfixtures import BootError

@pytest.mark.vm(image="panics")
def test_boot(vm):
    pass
'''


def test_kernel_panic_is_a_boot_error_with_diagnosis(tmp_path: Path, outer_cache: Path, spawn_pytest) -> None:
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(PANIC_CONFTEST)
    (suite / "test_p.py").write_text(PANIC_TEST)
    inner = spawn_pytest(suite, f"--vm-cache={outer_cache}", "--vm-boot-timeout=300")
    assert inner.proc.wait(600) != 0
    out = inner.output()
    assert "BootError" in out
    assert "diagnosis: kernel panic" in out
    assert "last console lines" in out and "Kernel panic" in out
    assert session_qemu(inner.proc.pid) == []


SMALL_IMAGE = "--vm-image=tiny"  # states made and made again here: tiny's boot takes seconds, debian-12's half a minute


def _state_of_its_own(tmp_path: Path, outer_cache: Path, spawn_pytest, check: str) -> tuple[Path, str, Path]:
    """A one-test suite run once with a provision key of its own: its suite, that key, and the state it saved."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_s.py").write_text(f"def test_s(vm):\n    {check}\n")
    key = f"--vm-provision-key={uuid.uuid4().hex}"
    first = spawn_pytest(suite, f"--vm-cache={outer_cache}", key, SMALL_IMAGE)
    assert first.proc.wait(600) == 0, first.output()[-3000:]
    return suite, key, max((outer_cache / "states").iterdir(), key=lambda p: p.stat().st_mtime)


def test_truncated_and_bit_flipped_states_are_rebuilt(tmp_path: Path, outer_cache: Path, spawn_pytest) -> None:
    suite, key, newest = _state_of_its_own(tmp_path, outer_cache, spawn_pytest, "assert vm.run('true').ok")
    memory = newest / "memory"
    memory.chmod(0o600)
    with open(memory, "r+b") as f:  # one flipped bit in the middle
        f.seek(memory.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    second = spawn_pytest(suite, f"--vm-cache={outer_cache}", key, SMALL_IMAGE)
    assert second.proc.wait(600) == 0, second.output()[-3000:]
    assert Cache.check_manifest(newest) is None  # rebuilt, intact again
    disk = newest / "disk.qcow2"
    disk.chmod(0o600)
    with open(disk, "r+b") as f:
        f.truncate(disk.stat().st_size // 2)
    third = spawn_pytest(suite, f"--vm-cache={outer_cache}", key, SMALL_IMAGE)
    assert third.proc.wait(600) == 0, third.output()[-3000:]
    assert Cache.check_manifest(newest) is None
    shutil.rmtree(newest, ignore_errors=True)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    if shutil.which("mount") is None or subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() != "0":
        pytest.skip("mounting a small tmpfs needs root (CI runs this as root)")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=460m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_cache_filesystem_is_a_clear_error(small_fs: Path, outer_cache: Path, spawn_pytest, tmp_path: Path) -> None:
    image = ensure_image(Cache(outer_cache), "debian-12", [BUILTIN_IMAGES_DIR], lambda m: None)
    # The image fits; its saved state (about 140 MB more) does not.
    shutil.copytree(image.directory, small_fs / "images" / image.directory.name)
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_f.py").write_text("def test_f(vm):\n    pass\n")
    filler = small_fs / "filler"
    free = shutil.disk_usage(small_fs).free
    filler.write_bytes(b"\0" * max(0, free - 40 * 1024 * 1024))
    inner = spawn_pytest(suite, f"--vm-cache={small_fs}")
    assert inner.proc.wait(600) != 0
    out = inner.output()
    assert "No space left on device" in out or "ENOSPC" in out or "no space" in out.lower()
    states = small_fs / "states"
    assert not states.exists() or not any(states.iterdir()), "a half-written state was left in the cache"
    assert session_qemu(inner.proc.pid) == []


class HostServer:
    """A TCP server on the host's loopback that records whether anyone connected."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(5)
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.hits = 0
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.hits += 1
            conn.sendall(b"host-secret\n")
            conn.close()

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def host_server() -> Iterator[HostServer]:
    server = HostServer()
    yield server
    server.close()


REACH = "timeout 10 bash -c 'exec 3<>/dev/tcp/10.0.2.2/{port}; cat <&3'"


def test_guest_cannot_reach_host_loopback_by_default(vm, host_server: HostServer) -> None:
    result = vm.run(REACH.format(port=host_server.port), timeout=30)
    assert not result.ok
    assert "host-secret" not in result.stdout
    assert host_server.hits == 0


@pytest.mark.vm(network="nat")
def test_guest_reaches_host_with_nat_opt_in(vm, host_server: HostServer) -> None:
    result = vm.run(REACH.format(port=host_server.port), timeout=30)
    assert result.stdout.strip() == "host-secret"
    assert host_server.hits == 1



def test_state_qemu_refuses_is_replaced_by_a_boot(tmp_path: Path, outer_cache: Path, spawn_pytest) -> None:
    """A state whose digests match but that QEMU cannot load (as after a QEMU change the key missed)."""
    suite, key, state = _state_of_its_own(tmp_path, outer_cache, spawn_pytest, "assert vm.run('echo ok').stdout == 'ok\\n'")
    memory = state / "memory"
    memory.chmod(0o600)
    garbage = b"not a migration stream" * 100
    memory.write_bytes(garbage)
    cache = Cache(outer_cache)
    manifest = cache.read_manifest(state)
    cache.write_manifest(state, {k: v for k, v in manifest.items() if k not in ("files", "created")}, ["disk.qcow2", "memory"])
    forged = cache.read_manifest(state)["created"]  # the digests now match the garbage: only QEMU can tell
    second = spawn_pytest(suite, f"--vm-cache={outer_cache}", key, SMALL_IMAGE)
    assert second.proc.wait(600) == 0, second.output()[-3000:]
    # The state was made again by a boot: a new manifest over a memory file that is not the garbage.
    assert cache.read_manifest(state)["created"] != forged
    with open(state / "memory", "rb") as made:
        assert made.read(len(garbage)) != garbage
    assert Cache.check_manifest(state) is None
    shutil.rmtree(state, ignore_errors=True)
