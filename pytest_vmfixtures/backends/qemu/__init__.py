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

from ..common import PORT_ATTEMPTS
from .backend import QemuBackend, QemuMachine
from .command import MachinePaths, build_command_line

__all__ = [
    "PORT_ATTEMPTS",
    "MachinePaths",
    "QemuBackend",
    "QemuMachine",
    "build_command_line",
]
