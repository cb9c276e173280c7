"""Helpers the libvirt tests share: a snapshot-mode pool held for a module, the machine behind a handle."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from pytest_vmfixtures.backends.libvirt import LibvirtMachine
from pytest_vmfixtures.guest import VM
from pytest_vmfixtures.pool import Pool
from pytest_vmfixtures.runtime import Runtime


def pool_on_network(pool_factory: Callable[..., tuple[Pool, Runtime]], uri: str,
                    network: str) -> Iterator[tuple[Pool, Runtime]]:
    """A snapshot-mode pool whose guests sit on ``network``, for a fixture to ``yield from``; closed after."""
    pool, runtime = pool_factory([uri], network=network)
    try:
        yield pool, runtime
    finally:
        pool.close()
        runtime.close()


def machine_of(vm: VM) -> LibvirtMachine:
    machine = vm._instance.machine
    assert isinstance(machine, LibvirtMachine)
    return machine


def ssh_output(vm: VM, command: str) -> str:
    """What ``command`` prints, run over the guest's own SSH connection (not the agent), as text."""
    _stdin, stdout, _stderr = vm.ssh.exec_command(command, timeout=60)
    return str(stdout.read().decode())
