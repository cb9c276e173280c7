"""The warm-up after a restore over SSH: a handshake the guest drops is tried again within the deadline
(seen on an emulated riscv64 guest right after a loadvm on a loaded host). The SSH peer here is a stand-in:
a real guest drops its first handshake only under load, not on demand."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pytest_vmfixtures.channels.ssh import SSH, HostKeyError, SSHError
from pytest_vmfixtures.command import CommandResult
from pytest_vmfixtures.instance import Instance, warm_up


class FlakySSH(SSH):
    """Fails its first ``failures`` connects with ``error``, then runs every command (it records them)."""

    def __init__(self, failures: int, error: type[SSHError] = SSHError) -> None:
        super().__init__("127.0.0.1", 2222, "root", key=None, host_key="", name="guest-1")  # type: ignore[arg-type]
        self.failures, self.error, self.connects, self.commands = failures, error, 0, []

    def connect(self, timeout: float = 10.0):  # type: ignore[no-untyped-def]
        self.connects += 1
        if self.connects <= self.failures:
            raise self.error("guest-1: SSH to [127.0.0.1]:2222 failed: No existing session")
        return None

    def exec(self, command: str, tag: str, timeout: float | None = None, **_: object) -> CommandResult:  # type: ignore[override]
        self.commands.append(command)
        return CommandResult(command, 0, "", "")


def instance_with(ssh: SSH) -> Instance:
    return Instance(machine=SimpleNamespace(name="guest-1"), ssh=ssh)  # type: ignore[arg-type]


def test_a_dropped_handshake_is_tried_again_and_the_clock_is_set() -> None:
    ssh = FlakySSH(failures=2)
    warm_up(instance_with(ssh), image=None, timeout=10.0)  # type: ignore[arg-type]
    assert ssh.connects == 3
    assert len(ssh.commands) == 1 and ssh.commands[0].startswith("date -u -s @")


def test_a_guest_that_never_takes_ssh_raises_the_last_ssh_error_at_the_deadline() -> None:
    ssh = FlakySSH(failures=10_000)
    with pytest.raises(SSHError, match="No existing session"):
        warm_up(instance_with(ssh), image=None, timeout=1.0)  # type: ignore[arg-type]
    assert ssh.connects > 1 and not ssh.commands


def test_another_host_key_is_not_tried_again() -> None:
    ssh = FlakySSH(failures=10_000, error=HostKeyError)
    with pytest.raises(HostKeyError):
        warm_up(instance_with(ssh), image=None, timeout=10.0)  # type: ignore[arg-type]
    assert ssh.connects == 1
