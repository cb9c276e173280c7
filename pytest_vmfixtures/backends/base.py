"""The contract every backend meets, and the plain data passed across it."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..channels.agent import AgentTransport
from ..images.image import BuiltImage

NETWORKS = ("restricted", "nat")


@dataclass(frozen=True)
class MachineConfig:
    """What a test asks for. Guests with equal configs are interchangeable."""

    image: str
    memory_mb: int = 512
    cpus: int = 1
    network: str = "restricted"
    # Only for your own image (a path or URL; see byo.py); None means the default.
    sha256: str | None = None
    user: str | None = None
    firmware: str | None = None

    def describe(self) -> str:
        return f"{self.label} ({self.memory_mb} MiB, {self.cpus} vCPU, network {self.network})"

    @property
    def label(self) -> str:
        """The image as a short name safe in file and guest names (a URL or path is shortened)."""
        from ..images.byo import is_byo, label_for

        return label_for(self.image, self.sha256) if is_byo(self.image) else self.image


@dataclass(frozen=True)
class LanSegment:
    """A private L2 segment between guests: a multicast group on the host's loopback.

    Frames never leave the host and no host address is on the segment, so
    guests on it reach each other and nothing else.
    """

    group: str
    port: int

    @property
    def endpoint(self) -> str:
        return f"{self.group}:{self.port}"


@dataclass(frozen=True)
class SavedState:
    """A ready guest frozen on disk: a read-only disk layer plus device and RAM state."""

    directory: Path
    disk: Path
    memory: Path
    key: str
    meta: dict[str, object] = field(default_factory=dict)


STATE_CONSOLE = "console.log"  # in a state's directory: the console of the boot it was saved from
RESTORE_MARK = "[vmfixtures] ---- restored from saved state"


def start_restored_console(state: SavedState, target: Path) -> None:
    """Begin a restored guest's console log with its state's boot console and a line marking the restore.

    The backend then appends what the guest prints afterwards (QEMU's ``append=on``, libvirt's
    ``append='on'``, or the console stream's append), so a failed test's evidence shows the boot too.
    """
    try:
        boot = (state.directory / STATE_CONSOLE).read_bytes()
    except OSError:
        boot = b"[vmfixtures] (this saved state was made before boot consoles were kept with states)\n"
    if boot and not boot.endswith(b"\n"):
        boot += b"\n"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    mark = f"{RESTORE_MARK} {state.key} at {when}; above: the boot it was saved from ----\n"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(boot + mark.encode())


class Monitor(Protocol):
    """QEMU's monitor, however it is reached (a unix socket, libvirt)."""

    def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = ...) -> Any: ...

    def human(self, command_line: str, timeout: float = ...) -> str: ...

    def send_fd(self, fd: int, fdname: str) -> None: ...

    def close(self) -> None: ...


class Machine(Protocol):
    """One running guest instance (a QEMU process, a libvirt domain).

    The guest agent is reached through ``agent_socket`` when the plugin owns
    the channel, or through ``agent_transport`` when the backend does.
    """

    name: str
    ssh_host: str
    ssh_port: int
    ssh_proxy: str | None  # a command whose stdin/stdout reach ssh_host:ssh_port (OpenSSH's ProxyCommand)
    console_log: Path

    @property
    def agent_socket(self) -> Path | None: ...

    @property
    def agent_transport(self) -> AgentTransport | None: ...

    @property
    def qmp(self) -> Monitor: ...

    @property
    def command_line(self) -> list[str]: ...

    def alive(self) -> bool: ...

    def after_load(self) -> None:
        """Repair what loading a state (a restore, a loadvm) leaves undone; most machines need nothing."""
        ...

    def exit_description(self) -> str:
        """How the machine ended (signal, status, QEMU's last words), for error messages."""
        ...

    def stop(self) -> None:
        """Kill the machine and remove what it owned; safe to call twice."""
        ...


# What a hypervisor can do for its guests, by name. A backend states its set once
# (``Backend.capabilities``); a test that needs one asks with @pytest.mark.vm(needs=[...]).
CAPABILITIES: dict[str, str] = {
    "saved_state": "restoring a saved state of a running guest",
    "qmp": "QEMU's monitor (vm.qmp)",
    "agent": "the QEMU guest agent channel",
    "console": "the guest's serial console log (vm.console_log)",
    "port_forward": "SSH through a port forwarded on the host's loopback",
}
ALL_CAPABILITIES = frozenset(CAPABILITIES)


def capabilities_of(backend: object) -> frozenset[str]:
    """The backend's capabilities; a backend from a plugin that states none is taken to have them all."""
    stated = getattr(backend, "capabilities", None)
    return frozenset(stated) if stated is not None else ALL_CAPABILITIES


class Backend(Protocol):
    name: str
    capabilities: frozenset[str]  # the CAPABILITIES its guests have

    def describe(self) -> str: ...

    def state_inputs(self, image: BuiltImage, config: MachineConfig) -> dict[str, object]:
        """Everything a saved state depends on besides the guest's contents (QEMU version, accel, CPU)."""
        ...

    def boot(self, image: BuiltImage, config: MachineConfig, name: str) -> Machine:
        """Start a guest from its image; returns once the process runs, not when the OS is up."""
        ...

    def save(self, machine: Machine, directory: Path) -> None:
        """Stop ``machine`` and write its disk layer and RAM state into ``directory`` (disk.qcow2, memory)."""
        ...

    def restore(self, image: BuiltImage, config: MachineConfig, state: SavedState, name: str) -> Machine:
        """Start a new guest from ``state``; returns with the guest running."""
        ...

    def keep(self, machine: Machine) -> None:
        """Leave ``machine`` running past :meth:`close`: a failed test's guest kept for a person."""
        ...

    def attach_lan(self, machine: Machine, segment: LanSegment, mac: str) -> None:
        """Hot-plug a NIC on ``segment`` into a running machine (gone with the instance at revert)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class SnapshotReverting(Protocol):
    """A backend without "saved_state": each guest keeps its clean state as a snapshot of its own machine.

    The pool then boots and provisions every guest itself, calls :meth:`take_clean`, and
    reverts it in place with :meth:`revert_clean` (the libvirt backend's snapshot mode).
    """

    def take_clean(self, machine: Machine) -> None:
        """Snapshot the running, provisioned ``machine`` as the state it is reverted to."""
        ...

    def revert_clean(self, machine: Machine) -> None:
        """Put ``machine`` back into its clean snapshot, running; SnapshotError if the hypervisor refuses.
        Snapshots taken with :meth:`take_named` since are removed."""
        ...

    def take_named(self, machine: Machine, name: str) -> None:
        """A test's own snapshot ``name`` of the running ``machine`` (``vm.snapshot``), until its next clean revert."""
        ...

    def revert_named(self, machine: Machine, name: str) -> None:
        """Back to the test's snapshot ``name``, running (``vm.revert``); SnapshotError if there is none."""
        ...


def digest_of(inputs: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def config_inputs(config: MachineConfig) -> dict[str, object]:
    """What a saved state depends on in the config. Unset bring-your-own keys are left out (so the
    states of recipe images keep their keys), and a URL with a digest is known by the digest: the
    same file served from elsewhere (another port) is the same image."""
    inputs = {k: v for k, v in asdict(config).items() if v is not None}
    if config.sha256 is not None:
        inputs["image"] = f"sha256:{config.sha256.lower()}"
    return inputs
