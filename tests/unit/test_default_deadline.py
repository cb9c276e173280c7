"""No command waits forever: vm.run, put and get given no timeout get the session's default deadline.

Fakes stand in for the guest; tests/integration/test_command_deadline.py shows the same on a real one.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pytest_vmfixtures.backends.base import MachineConfig
from pytest_vmfixtures.channels.ssh import SSH
from pytest_vmfixtures.command import DEFAULT_COMMAND_TIMEOUT, CommandResult
from pytest_vmfixtures.errors import CommandTimeout
from pytest_vmfixtures.guest import VM
from pytest_vmfixtures.instance import Instance
from pytest_vmfixtures.pool import Pool


class FakeSSH:
    """Records the deadline each operation was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def exec(self, command: str, tag: str, timeout: float | None) -> CommandResult:
        self.calls.append(("run", command, timeout))
        return CommandResult(command, 0, "", "")

    def transfer(self, direction: str, source: str, target: str, timeout: float) -> None:
        self.calls.append((direction, source, target, timeout))

    def close(self) -> None:
        pass


class FakeMachine:
    name = "fake-1"

    def alive(self) -> bool:
        return True


def _instance() -> Instance:
    return Instance(FakeMachine(), FakeSSH())  # type: ignore[arg-type]


def _vm(**kwargs: Any) -> VM:
    return VM("fake-1", SimpleNamespace(user="root", arch="x86_64"), MachineConfig(image="debian-12"), "tcg",  # type: ignore[arg-type]
              _instance(), fresh_instance=_instance, discard=lambda instance: None, **kwargs)


def _calls(vm: VM) -> list[tuple[Any, ...]]:
    return vm._instance.ssh.calls  # type: ignore[attr-defined,no-any-return]


def test_the_default_is_finite() -> None:
    assert 0 < DEFAULT_COMMAND_TIMEOUT < float("inf")
    assert _vm().command_timeout == DEFAULT_COMMAND_TIMEOUT


def test_run_without_a_timeout_gets_the_default_deadline() -> None:
    vm = _vm(command_timeout=7.0)
    vm.run("a")
    vm.run("b", timeout=None)
    vm.run("c", timeout=2.5)  # an explicit timeout wins, shorter or longer
    vm.run("d", timeout=3600)
    assert _calls(vm) == [("run", "a", 7.0), ("run", "b", 7.0), ("run", "c", 2.5), ("run", "d", 3600)]


def test_put_and_get_get_the_default_deadline_too(tmp_path: Path) -> None:
    vm = _vm(command_timeout=7.0)
    vm.put(tmp_path / "up", "/root/up")
    vm.get("/root/down", tmp_path / "down", timeout=1.5)
    assert _calls(vm) == [("put", str(tmp_path / "up"), "/root/up", 7.0), ("get", "/root/down", str(tmp_path / "down"), 1.5)]


def test_guests_from_the_pool_carry_its_default() -> None:
    # vm and vm_factory both get their guests from Pool.acquire, which makes the handle here.
    pool = Pool(None, None, None, [], accel="tcg", command_timeout=42.0)  # type: ignore[arg-type]
    try:
        vm = pool._handle(SimpleNamespace(user="root", arch="x86_64"), MachineConfig(image="debian-12"), _instance(), slot=None)  # type: ignore[arg-type]
    finally:
        pool.executor.shutdown()
    assert vm.command_timeout == 42.0
    vm.run("true")
    assert _calls(vm) == [("run", "true", 42.0)]


# -- SSH.transfer: paramiko's SFTP has no deadline of its own --------------------------------


class HangingSFTP:
    """An SFTP session whose server never answers: a transfer waits until the session is closed."""

    def __init__(self, hang: bool = True, error: Exception | None = None) -> None:
        self.hang = hang
        self.error = error
        self.closed = threading.Event()
        self.done: list[tuple[str, str, str]] = []

    def _copy(self, direction: str, source: str, target: str) -> None:
        if self.error is not None:
            raise self.error
        if self.hang:
            self.closed.wait(30)
            raise EOFError  # what paramiko raises when its channel is closed under it
        self.done.append((direction, source, target))

    def put(self, source: str, target: str) -> None:
        self._copy("put", source, target)

    def get(self, source: str, target: str) -> None:
        self._copy("get", source, target)

    def close(self) -> None:
        self.closed.set()


class FakeSFTPSSH(SSH):
    def __init__(self, sftp: HangingSFTP) -> None:
        super().__init__("127.0.0.1", 2222, "root", None, "", "fake-1")  # type: ignore[arg-type]
        self._sftp = sftp  # type: ignore[assignment]

    @property
    def sftp(self) -> Any:
        return self._sftp


@pytest.mark.parametrize("direction", ["put", "get"])
def test_a_hung_transfer_ends_at_its_deadline(direction: str) -> None:
    hung = HangingSFTP()
    ssh = FakeSFTPSSH(hung)
    started = time.monotonic()
    with pytest.raises(CommandTimeout) as info:
        ssh.transfer(direction, "a", "b", 0.3)
    assert time.monotonic() - started >= 0.3  # not before its deadline
    assert info.value.timeout == 0.3
    assert str(info.value) == f"command 'sftp {direction} a b' did not finish within 0.3 s"
    assert hung.closed.is_set()
    assert ssh._sftp is None  # the next transfer opens a new session


def test_a_transfer_in_time_keeps_the_session() -> None:
    sftp = HangingSFTP(hang=False)
    ssh = FakeSFTPSSH(sftp)
    ssh.transfer("put", "a", "b", 0.3)
    time.sleep(0.4)  # the timer was cancelled: nothing closes the session afterwards
    assert sftp.done == [("put", "a", "b")]
    assert not sftp.closed.is_set()
    assert ssh._sftp is sftp


def test_a_transfer_error_in_time_is_not_a_timeout() -> None:
    ssh = FakeSFTPSSH(HangingSFTP(error=FileNotFoundError(2, "No such file")))
    with pytest.raises(FileNotFoundError):
        ssh.transfer("get", "/nope", "x", 5)
