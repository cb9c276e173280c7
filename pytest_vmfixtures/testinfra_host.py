"""``vm.host``: a testinfra ``Host`` whose commands go through the guest's own channel.

testinfra is optional (``pip install pytest-vmfixtures[testinfra]``) and imported only
when a test first asks for ``vm.host``. The backend holds the handle, not a channel:
each command goes through ``vm.run``, so it takes whichever channel reaches the guest
now (the agent, else SSH), runs as root as ``vm.run`` does, counts as use, and after
a revert talks to the clean guest that replaced the old one.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Protocol

from .command import CommandResult
from .errors import MissingExtra

EXTRA = "pip install 'pytest-vmfixtures[testinfra]'"
MIN_TESTINFRA = (10, 0)


class Runs(Protocol):
    """What a testinfra host needs of the VM handle (guest.VM): its name and its ``run``."""

    name: str

    def run(self, command: str, timeout: float | None = None, check: bool = False) -> CommandResult: ...


def _testinfra() -> tuple[Any, Any]:
    """testinfra's ``Host`` class and backend base module, or one line saying what to install."""
    try:
        host = importlib.import_module("testinfra.host")
        base = importlib.import_module("testinfra.backend.base")
    except ImportError as exc:
        raise MissingExtra(f"vm.host needs testinfra ({exc.msg}): {EXTRA}") from None
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("pytest-testinfra")
    except PackageNotFoundError:
        return host.Host, base  # imported from a source tree: trust it
    parts = tuple(int(p) for p in found.split(".")[:2] if p.isdigit())
    if parts < MIN_TESTINFRA:
        raise MissingExtra(f"vm.host needs pytest-testinfra >= {'.'.join(map(str, MIN_TESTINFRA))}, "
                               f"found {found}: {EXTRA}")
    return host.Host, base


def make_host(vm: Runs) -> Any:
    """A ``testinfra.host.Host`` for ``vm`` (one per handle; it follows the handle across reverts)."""
    host_class, base = _testinfra()
    backend = _backend_class(base)(vm)
    host = host_class(backend)
    backend.set_host(host)
    return host


@functools.cache
def _backend_class(base: Any) -> type:
    """The backend class, made once (its base class comes from testinfra, imported late)."""

    class VMBackend(base.BaseBackend):  # type: ignore[misc]
        """Runs testinfra's commands with ``vm.run`` (root, the guest's current channel)."""

        NAME = "vmfixtures"

        def __init__(self, vm: Runs) -> None:
            super().__init__(vm.name)
            self.vm = vm

        def run(self, command: str, *args: str, **kwargs: Any) -> Any:
            line = self.get_command(command, *args)
            result = self.vm.run(line)
            return self.result(result.returncode, self.encode(line), result.stdout, result.stderr)

        def get_encoding(self) -> str:
            return "utf-8"  # what vm.run decodes with, whatever the guest's locale

        def get_pytest_id(self) -> str:
            return f"vmfixtures://{self.vm.name}"

    return VMBackend
