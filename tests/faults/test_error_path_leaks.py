"""What a guest that fails to start leaves behind: nothing (review finding L6).

No guest boots here: the failure comes before QEMU would start.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_vmfixtures.backends.base import MachineConfig
from pytest_vmfixtures.errors import GuestError

from .conftest import inline_pool


def test_a_cold_boot_that_fails_before_qemu_starts_removes_its_ram_file(outer_cache: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The RAM file of a mapped state's cold boot has all its blocks reserved: one left per failed attempt
    would fill the cache's filesystem. Here the overlay cannot be made (its image vanished, say)."""
    with inline_pool(outer_cache, "leak-faults", ram_state="mapped") as pool:
        image = pool.image("tiny")
        backend = pool.backend

        def no_overlay(*args: object, **kwargs: object) -> None:
            raise GuestError("cannot create overlay: (made to fail here)")

        monkeypatch.setattr(backend, "_overlay", no_overlay)
        name = pool.runtime.new_name("tiny")
        with pytest.raises(GuestError, match="made to fail here"):
            backend.boot(image, MachineConfig("tiny"), name)
        files = pool.runtime.run_dir / name
        assert files.is_dir() and not (files / "ram").exists()


def test_a_ready_hook_that_raises_stops_the_guest(outer_cache: Path) -> None:
    """A pytest_vm_ready hook that fails leaves no guest running: nobody holds it to stop it later."""
    with inline_pool(outer_cache, "leak-faults") as pool:
        started: list[object] = []

        def ready(vm: object) -> None:
            started.append(vm)
            raise RuntimeError("the ready hook failed (made to fail here)")

        pool.ready = ready
        with pytest.raises(RuntimeError, match="made to fail here"):
            pool.acquire(MachineConfig("tiny"))
        (vm,) = started
        assert not vm.machine_alive()  # type: ignore[attr-defined]
