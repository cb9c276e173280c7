"""One guest of the libvirt backend: a domain (transient; persistent in snapshot mode), and the files it owns."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...errors import GuestError
from ..common import log_tail
from .calls import bounded, libvirt
from .channels import LibvirtAgentTransport, LibvirtQMP
from .connection import Host, connection_lost, log_dir
from .console import ConsolePump
from .ssh_route import ssh_route
from .storage import StateCopy
from .teardown import drop_domain

STATE_CALL_SECONDS = 30.0  # isActive and state: libvirtd answers these at once unless it is stuck


class LibvirtMachine:
    """A transient libvirt domain and the files it owns."""

    def __init__(
        self, host: Host, domain: Any, name: str, files: Path, ssh_port: int, xml: str,
        has_agent: bool, backing: Path, overlay: str, nvram: Path | None = None,
        *, on_stop: Callable[[LibvirtMachine], None],
    ) -> None:
        """``on_stop``: called once from stop(), after the domain is dropped (the placement forgets it)."""
        self._on_stop = on_stop
        self.host = host
        self.domain = domain
        self.domain_name = str(domain.name())
        self.placed_as = self.domain_name  # the name the backend placed it under (see saved_state.SavedStateMode._restore_copy)
        self.name = name
        self.files = files
        self.xml = xml
        self.ssh_host = "127.0.0.1"
        self.ssh_port = ssh_port
        self.ssh_proxy = ssh_route(host.uri, ssh_port) if host.storage is not None else None
        self.nic_mac: str | None = None  # snapshot mode: the NIC on the shared network SSH must reach (snapshot_mode.py)
        self.console_log = files / "console.log"
        self.agent_socket: Path | None = None  # libvirt owns it; see agent_transport
        self.agent_transport = LibvirtAgentTransport(domain, name) if has_agent else None
        self.runner_socket: Path | None = None  # vmfx-runner's port where the plugin reaches it (set by the backend)
        self.qmp = LibvirtQMP(domain, name)
        self.backing = backing  # the local file this guest's disk layer sits on
        self.overlay = overlay  # a path on the host: a file here, or a volume in a remote host's pool
        self.nvram = nvram  # a UEFI guest's own NVRAM (a qcow2 overlay here), saved with its state
        self.console: ConsolePump | None = None
        self.state_copy: StateCopy | None = None
        # Snapshot mode: the domain is persistent, with the clean snapshot it is reverted to (snapshot.py).
        self.snapshot: Any = None
        self._stopped = False
        self._lock = threading.Lock()
        self.unanswered = ""  # why alive() could not tell, if libvirt did not answer it in time

    @property
    def uri(self) -> str:
        return self.host.uri

    @property
    def command_line(self) -> list[str]:
        """QEMU's argv as libvirt builds it (for error messages)."""
        try:
            argv = str(self.host.conn.domainXMLToNative("qemu-argv", self.xml, 0))
        except Exception:
            return ["libvirt", self.host.uri, self.domain_name]
        return argv.split()

    def alive(self) -> bool:
        if self._stopped:
            return False
        try:
            return bool(bounded(f"libvirt at {self.host.uri} (is {self.domain_name} running?)", self.domain.isActive,
                                STATE_CALL_SECONDS))
        except libvirt.libvirtError:
            return False  # a transient domain that ended is gone
        except GuestError as exc:  # a stuck libvirtd: the machine cannot be used, and exit_description says why
            self.unanswered = str(exc)
            return False

    def after_load(self) -> None:
        """Nothing: the libvirt backend runs x86 guests, whose state loads whole."""

    def exit_description(self) -> str:
        if self.alive():
            return "still running"
        if self.unanswered:
            return f"{self.unanswered} (libvirtd stuck or overloaded); domain {self.domain_name} may still run there"
        if connection_lost(self.host.conn):
            return (f"the connection to libvirt at {self.host.uri} was lost (libvirtd stopped or the host is "
                    f"unreachable); domain {self.domain_name} may still run there until a later run reaps it")
        tail = self.log_tail(3)
        return f"libvirt domain {self.domain_name} on {self.host.uri} ended" + (f": {tail}" if tail else "")

    def log_tail(self, lines: int = 10) -> str:
        if self.host.storage is not None:
            return ""  # libvirt's log of the domain is on the other host
        return log_tail(log_dir(self.host.uri) / f"{self.domain_name}.log", lines)

    def state(self) -> str:
        """libvirt's view: running, paused, shut off, ..."""
        try:
            code = bounded(f"libvirt at {self.host.uri} (the state of {self.domain_name})", self.domain.state,
                           STATE_CALL_SECONDS)[0]
        except libvirt.libvirtError:
            return "gone"
        except GuestError:
            return "unknown (libvirt did not answer)"
        names = {libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_PAUSED: "paused",
                 libvirt.VIR_DOMAIN_SHUTOFF: "shut off", libvirt.VIR_DOMAIN_CRASHED: "crashed"}
        return names.get(code, f"state {code}")

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self.qmp.close()
        if self.agent_transport is not None:
            self.agent_transport.close()
        drop_domain(self.domain)  # a persistent one (snapshot mode) undefined too, with its snapshots
        if self.console is not None:
            self.console.close()
        self._on_stop(self)
        if self.host.storage is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self.host.storage.delete(Path(self.overlay).name)
            return
        own = [Path(self.overlay)] + ([self.nvram] if self.nvram is not None else [])
        for path in (*own, log_dir(self.host.uri) / f"{self.domain_name}.log"):
            with contextlib.suppress(OSError):  # absent, or libvirt's log is not ours to remove
                path.unlink()
