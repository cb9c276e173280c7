"""A fault at a step of a QEMU guest's start leaves no QEMU process and no overlay behind.

Each fault is made real: a real QEMU that is frozen (SIGSTOP) so its monitor never answers, a real
QEMU killed before its monitor connects, a start interrupted by an exception from the caller's side.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_vmfixtures.accel import choose_accel, probe_host
from pytest_vmfixtures.backends import qemu
from pytest_vmfixtures.backends.base import MachineConfig
from pytest_vmfixtures.errors import BootError
from pytest_vmfixtures.images.cache import Cache, ensure_image
from pytest_vmfixtures.images.catalog import BUILTIN_IMAGES_DIR
from pytest_vmfixtures.images.image import BuiltImage
from pytest_vmfixtures.runtime import Runtime


@contextlib.contextmanager
def qemu_backend(outer_cache: Path, run_root: Path, worker: str) -> Iterator[tuple[qemu.QemuBackend, Runtime, BuiltImage]]:
    """A QEMU backend whose guests' files live under ``run_root``, and the cached debian-12 image."""
    runtime = Runtime(run_root, worker)
    try:
        image = ensure_image(Cache(outer_cache), "debian-12", [BUILTIN_IMAGES_DIR], lambda _m: None)
        yield qemu.QemuBackend(runtime, choose_accel("auto", probe_host())), runtime, image
    finally:
        runtime.close()


@pytest.fixture
def backend(outer_cache: Path) -> Iterator[tuple[qemu.QemuBackend, Runtime, BuiltImage]]:
    with qemu_backend(outer_cache, outer_cache, "start-faults") as started:
        yield started


def started_then(fault: Callable[[qemu.QemuMachine], None], seen: list[qemu.QemuMachine]) -> Callable[..., None]:
    real = qemu.QemuMachine.connect_qmp

    def connect_qmp(self: qemu.QemuMachine, timeout: float) -> None:
        seen.append(self)
        fault(self)
        real(self, min(timeout, 3.0))

    return connect_qmp


def frozen(machine: qemu.QemuMachine) -> None:
    os.kill(machine.process.pid, signal.SIGSTOP)


def killed(machine: qemu.QemuMachine) -> None:
    os.kill(machine.process.pid, signal.SIGKILL)


def interrupted(machine: qemu.QemuMachine) -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize("fault, error", [(frozen, BootError), (killed, BootError), (interrupted, KeyboardInterrupt)],
                         ids=["qmp-never-answers", "process-dies", "interrupted"])
def test_failed_start_leaves_no_qemu_and_no_overlay(
        backend: tuple[qemu.QemuBackend, Runtime, BuiltImage], monkeypatch: pytest.MonkeyPatch,
        fault: Callable[[qemu.QemuMachine], None], error: type[BaseException]) -> None:
    qemu_backend, runtime, image = backend
    seen: list[qemu.QemuMachine] = []
    monkeypatch.setattr(qemu.QemuMachine, "connect_qmp", started_then(fault, seen))
    with pytest.raises(error):
        qemu_backend.boot(image, MachineConfig("debian-12"), runtime.new_name("fault"))
    assert seen, "the fault was never injected"
    for machine in seen:
        assert machine.process.poll() is not None, f"QEMU {machine.process.pid} still runs"
        assert not machine.paths.overlay.exists(), f"{machine.paths.overlay} left behind"


def test_a_cache_path_with_a_comma_works(outer_cache: Path, tmp_path: Path) -> None:
    """Every path QEMU gets in its option syntax is escaped: a real guest starts from a comma'd run dir."""
    with qemu_backend(outer_cache, tmp_path / "cache,readonly=on", "comma") as (comma_backend, runtime, image):
        machine = comma_backend.boot(image, MachineConfig("debian-12"), runtime.new_name("comma"))
        try:
            assert machine.qmp.execute("query-status")["status"] == "running"
            blocks = [b["inserted"] for b in machine.qmp.execute("query-block") if "inserted" in b]
            assert any(b["file"] == str(machine.paths.overlay) and not b["ro"] for b in blocks), blocks
        finally:
            machine.stop()
        assert not machine.paths.overlay.exists()
