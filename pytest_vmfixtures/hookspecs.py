"""Hooks other plugins and conftest files implement to shape guests.

A conftest writes ``def pytest_vm_provision(vm): vm.run("apt-get install -y ./my.deb", check=True)``
and every guest of the run starts with the software in place; the ready
state saved afterwards includes it, so it runs once per cache, not per test.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .accel import AccelChoice
    from .backends.base import Backend
    from .guest import VM
    from .runtime import Runtime


@pytest.hookspec(firstresult=True)
def pytest_vm_make_backend(config: pytest.Config, runtime: Runtime, accel: AccelChoice) -> Backend | None:
    """Return the backend that starts guests. The built-in QEMU backend answers last."""


@pytest.hookspec
def pytest_vm_provision(vm: VM) -> None:
    """Prepare a freshly booted guest once, before its clean state is saved.

    What this does ends up in every test's starting state. The saved state's
    cache key covers the source of every implementation of this hook (and
    the ``vm_provision_key`` ini value), so changing the code provisions again.
    """


@pytest.hookspec
def pytest_vm_ready(vm: VM) -> None:
    """A guest handle is about to be handed to its first test in this session."""


@pytest.hookspec(firstresult=True)
def pytest_vm_image_resolve(config: pytest.Config, name: str) -> Any:
    """Return a BuiltImage for ``name`` from a source of your own, or None to use the catalog."""
