"""The embedded backend: QEMU processes the plugin starts itself, no daemon.

Each machine runs on its own qcow2 overlay over a read-only layer (the image,
or a saved state's frozen disk), with user-mode networking that forwards one
loopback port to the guest's sshd and, by default, lets the guest reach
nothing on the host (``restrict=on``). QMP and the guest agent sit on unix
sockets in a 0700 directory. A state's device stream moves through file
descriptors handed over QMP; a mapped state's RAM file QEMU opens by its path
(memory.py). QEMU runs with ``-sandbox spawn=deny``.

``command.py`` builds the command line (pure, unit-tested); ``backend.py``
starts, saves, restores and stops the processes.
"""

from .backend import DEFAULT_BINARY, PORT_ATTEMPTS, QemuBackend, QemuMachine, host_cpu_id, qemu_version
from .command import OVMF_CANDIDATES, MachinePaths, build_command_line, find_ovmf, opt

__all__ = [
    "DEFAULT_BINARY",
    "OVMF_CANDIDATES",
    "PORT_ATTEMPTS",
    "MachinePaths",
    "QemuBackend",
    "QemuMachine",
    "build_command_line",
    "find_ovmf",
    "host_cpu_id",
    "opt",
    "qemu_version",
]
