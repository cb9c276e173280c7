"""pytest-vmfixtures: a clean real machine for every test, fast.

The ``vm`` and ``vm_factory`` fixtures and the ``vm`` marker come from the
plugin, loaded by pytest through its entry point; this module exports what
test code names directly.
"""

from __future__ import annotations

from .backends.base import MachineConfig
from .command import CommandResult
from .errors import (
    BootError,
    CommandError,
    CommandLost,
    CommandTimeout,
    GuestError,
    ImageError,
    MissingExtra,
    QMPError,
    SnapshotError,
    VMError,
    WaitTimeout,
)
from .guest import VM, GuestState
from .images.image import GuestOS

__version__ = "0.2.0"

__all__ = [
    "VM",
    "BootError",
    "CommandError",
    "CommandLost",
    "CommandResult",
    "CommandTimeout",
    "GuestError",
    "GuestOS",
    "GuestState",
    "ImageError",
    "MachineConfig",
    "MissingExtra",
    "QMPError",
    "SnapshotError",
    "VMError",
    "WaitTimeout",
    "__version__",
]
