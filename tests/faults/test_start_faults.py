"""A fault at a step of a QEMU guest's start leaves no QEMU process and no overlay behind.

Each fault is made real: a real QEMU that is frozen (SIGSTOP) so its monitor never answers, a real
QEMU killed before its monitor connects, a start interrupted by an exception from the caller's side,
an SSH port another process holds, a restored guest whose CPUs are stopped so its agent (and SSH)
never answer, a client key that is gone when the channels are made.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_vmfixtures import slot as slot_module
from pytest_vmfixtures.accel import choose_accel, probe_host
from pytest_vmfixtures.backends import qemu
from pytest_vmfixtures.backends.base import Machine, MachineConfig
from pytest_vmfixtures.backends.qemu import backend as qemu_module
from pytest_vmfixtures.errors import BootError, VMError
from pytest_vmfixtures.images.cache import Cache, ensure_image
from pytest_vmfixtures.images.catalog import BUILTIN_IMAGES_DIR
from pytest_vmfixtures.images.image import BuiltImage
from pytest_vmfixtures.instance import Instance
from pytest_vmfixtures.pool import Pool
from pytest_vmfixtures.runtime import Runtime

from .conftest import inline_pool


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


def assert_gone(machines: list[qemu.QemuMachine]) -> None:
    assert machines, "the fault was never injected"
    for machine in machines:
        assert machine.process.poll() is not None, f"QEMU {machine.process.pid} still runs"
        assert not machine.paths.overlay.exists(), f"{machine.paths.overlay} left behind"


@pytest.mark.parametrize("attempts_taken", [1, qemu.PORT_ATTEMPTS], ids=["taken-once", "taken-always"])
def test_a_taken_ssh_port(backend: tuple[qemu.QemuBackend, Runtime, BuiltImage], monkeypatch: pytest.MonkeyPatch,
                          attempts_taken: int) -> None:
    """Another process binds the port between the probe and QEMU's bind: the start retries another port,
    and when every attempt meets a taken port it fails with BootError; no QEMU or overlay stays either way."""
    qemu_backend, runtime, image = backend
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        ports = [taken] * attempts_taken
        monkeypatch.setattr(qemu_module, "free_port", lambda real=qemu_module.free_port: ports.pop() if ports else real())
        seen: list[qemu.QemuMachine] = []
        monkeypatch.setattr(qemu.QemuMachine, "connect_qmp", started_then(lambda m: None, seen))
        if attempts_taken == qemu.PORT_ATTEMPTS:
            with pytest.raises(BootError):
                qemu_backend.boot(image, MachineConfig("debian-12"), runtime.new_name("port"))
            assert len(seen) == qemu.PORT_ATTEMPTS
            assert_gone(seen)
            return
        machine = qemu_backend.boot(image, MachineConfig("debian-12"), runtime.new_name("port"))
        try:
            assert machine.ssh_port != taken and machine.qmp.execute("query-status")["status"] == "running"
            assert len(seen) == 2 and seen[0].process.poll() is not None  # the retry reuses its paths
        finally:
            machine.stop()
        assert_gone(seen)


@pytest.fixture
def pool(outer_cache: Path) -> Iterator[Pool]:
    """A pool over the run's cache (so the saved debian-12 state is reused), guests restored in line."""
    with inline_pool(outer_cache, "start-faults-pool") as made:
        yield made


def recording_restore(pool: Pool, monkeypatch: pytest.MonkeyPatch) -> list[Machine]:
    restored: list[Machine] = []
    real = pool.backend.restore

    def restore(*args: object, **kwargs: object) -> Machine:
        machine = real(*args, **kwargs)  # type: ignore[arg-type]
        restored.append(machine)
        return machine

    monkeypatch.setattr(pool.backend, "restore", restore)
    return restored


def test_a_restored_guest_whose_agent_never_answers(pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest's CPUs are stopped right after the restore (a real stopped guest: neither its agent nor its
    sshd answers); warm-up gives up at its deadline, shortened here, and the guest is stopped."""
    slot = pool._slot(MachineConfig("debian-12"))
    restored = recording_restore(pool, monkeypatch)
    real_bind = slot_module.bind_channels

    def bind_stopped(machine: Machine, image: BuiltImage, *flags: bool, **options: bool) -> Instance:
        machine.qmp.execute("stop")
        return real_bind(machine, image, *flags, **options)

    monkeypatch.setattr(slot_module, "bind_channels", bind_stopped)
    monkeypatch.setattr(slot_module, "warm_up", functools.partial(slot_module.warm_up, timeout=3.0))
    with pytest.raises(VMError):
        slot.new_instance()
    assert_gone(restored)  # type: ignore[arg-type]


def test_channels_that_cannot_be_made(pool: Pool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The image's client key is gone when the restored guest's channels are made: the guest is stopped."""
    slot = pool._slot(MachineConfig("debian-12"))
    restored = recording_restore(pool, monkeypatch)
    slot.image = dataclasses.replace(slot.image, client_key=tmp_path / "gone")
    with pytest.raises(OSError):
        slot.new_instance()
    assert_gone(restored)  # type: ignore[arg-type]
