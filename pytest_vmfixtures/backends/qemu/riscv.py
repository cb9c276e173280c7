"""RISC-V guests: the timer a state load loses, written back.

QEMU (7.2 here; fixed upstream only in late 2025) saves the ACLINT timer's
compare registers but does not re-arm the host timer behind them when a state
is loaded, so a restored RISC-V guest never gets its next timer interrupt
and stalls. Writing each hart's compare register back with the value it holds
re-arms it, as the guest's own write would. On a QEMU that migrates the timer
the write changes nothing.
"""

from __future__ import annotations

from pathlib import Path

from ...channels.gdbstub import GdbStub
from ..common import opt

# The virt machine's ACLINT mtimer: one 8-byte compare register per hart from here.
MTIMECMP = 0x2004000


def gdb_arguments(socket: Path) -> list[str]:
    """QEMU options for a gdbstub on a private unix socket (no TCP port, nothing waits for it)."""
    return ["-chardev", f"socket,id=gdb0,path={opt(socket)},server=on,wait=off", "-gdb", "chardev:gdb0"]


def rearm_timers(socket: Path, name: str, harts: int) -> None:
    with GdbStub(socket, name) as gdb:
        gdb.physical()
        for hart in range(harts):
            address = MTIMECMP + 8 * hart
            gdb.write(address, gdb.read(address, 8))
