"""The gdbstub client against a real QEMU (a RISC-V virt machine held before its first instruction).

It is how a restored RISC-V guest gets its timer back (backends/qemu/riscv.py): the write must reach
the ACLINT timer as a device write, which reading the register back shows.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_vmfixtures.backends.qemu.riscv import MTIMECMP, gdb_arguments, rearm_timers
from pytest_vmfixtures.channels.gdbstub import GdbStub, frame
from pytest_vmfixtures.errors import GuestError

QEMU = "qemu-system-riscv64"


@pytest.fixture
def stub(tmp_path: Path) -> Iterator[Path]:
    if shutil.which(QEMU) is None:
        pytest.fail(f"{QEMU} is missing: scripts/bootstrap installs qemu-system-misc")
    socket = tmp_path / "gdb"
    process = subprocess.Popen([QEMU, "-M", "virt", "-smp", "2", "-display", "none", "-nodefaults", "-S",
                                *gdb_arguments(socket)], stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not socket.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        yield socket
    finally:
        process.kill()
        process.wait(10)


def test_frames_carry_the_byte_sum_checksum() -> None:
    assert frame("?") == b"$?#3f"
    assert frame("m2004000,8") == b"$m2004000,8#" + f"{sum(b'm2004000,8') % 256:02x}".encode()


def test_physical_writes_reach_the_timer_device(stub: Path) -> None:
    with GdbStub(stub, "riscv") as gdb:
        gdb.physical()
        assert gdb.read(MTIMECMP + 8, 8) == bytes(8)
        gdb.write(MTIMECMP + 8, (123456789).to_bytes(8, "little"))  # hart 1's compare register
        assert int.from_bytes(gdb.read(MTIMECMP + 8, 8), "little") == 123456789


def test_rearming_keeps_every_harts_compare_value(stub: Path) -> None:
    with GdbStub(stub, "riscv") as gdb:
        gdb.physical()
        gdb.write(MTIMECMP, (1 << 40).to_bytes(8, "little"))
    rearm_timers(stub, "riscv", harts=2)
    with GdbStub(stub, "riscv") as gdb:
        gdb.physical()
        assert int.from_bytes(gdb.read(MTIMECMP, 8), "little") == 1 << 40


def test_a_missing_stub_is_a_guest_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(GuestError, match="cannot reach QEMU's gdbstub"):
        GdbStub(tmp_path / "nothing", "riscv", timeout=1)
