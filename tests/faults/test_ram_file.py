"""A mapped state's RAM file changed under a running session: found before the next restore, the state
is made again, and no guest ever runs from the changed file.

Each fault is real: the state's own file in the run's cache is modified in place, truncated or deleted
while a guest restored from it runs, as a stray process or a full disk could. The ``tiny`` image keeps
the state's remaking short.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_vmfixtures.backends import qemu
from pytest_vmfixtures.backends.base import MachineConfig
from pytest_vmfixtures.backends.qemu import memory
from pytest_vmfixtures.images.cache import sha256_file
from pytest_vmfixtures.pool import Pool

from .conftest import inline_pool

CONFIG = MachineConfig("tiny")


@pytest.fixture
def pool(outer_cache: Path) -> Iterator[Pool]:
    with inline_pool(outer_cache, "ram-file-faults", ram_state="mapped") as made:
        yield made


def modify(ram: Path) -> None:
    os.chmod(ram, 0o600)
    with open(ram, "r+b") as f:  # a page in the middle: the kernel's, the guest's, or a hole
        f.seek(os.path.getsize(ram) // 2)
        f.write(b"\xa5" * 4096)


def truncate(ram: Path) -> None:
    os.chmod(ram, 0o600)
    os.truncate(ram, os.path.getsize(ram) // 2)


FAULTS = {"modified": modify, "truncated": truncate, "deleted": os.unlink}


def mapped_file(machine: object) -> Path:
    assert isinstance(machine, qemu.QemuMachine) and machine.ram is not None, "the guest's RAM is not mapped"
    assert not machine.ram.shared, "a restored guest must map its state's RAM privately"
    return machine.ram.path


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_changed_ram_file_is_never_run_and_its_state_is_made_again(pool: Pool, fault: str) -> None:
    vm = pool.acquire(CONFIG)
    slot = pool._slots[CONFIG]
    before = slot.state
    ram = mapped_file(vm._instance.machine)
    assert ram == before.directory / memory.RAM_NAME
    vm.run("echo dirty > /root/mark", check=True)

    FAULTS[fault](ram)

    pool.release(vm)  # the revert restores the next guest: the check must refuse the changed file
    assert slot.state is not before, "the state was not made again"
    now = mapped_file(vm._instance.machine)
    recorded = json.loads((slot.state.directory / memory.RAM_FINGERPRINT).read_text())
    info = now.stat()
    assert (info.st_size, info.st_mtime_ns) == (recorded["size"], recorded["mtime_ns"])
    manifest = json.loads((slot.state.directory / "manifest.json").read_text())
    assert sha256_file(now) == manifest["files"][memory.RAM_NAME], "the guest maps a RAM file other than the saved one"
    assert vm.run("cat /root/mark 2>/dev/null || echo clean").stdout.strip() == "clean"
    assert vm.run("echo $((6 * 7))").stdout.strip() == "42"
