"""Connections to libvirtds: opening one per URI, what each host is, choosing one for a new guest.

Several hosts: each URI is one libvirtd; a new guest goes to the connection
with the fewest running guests. A libvirtd reached over a unix socket shares
this machine's files; any other transport is a remote host, with a storage
pool for copies (storage.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ...errors import GuestError
from ...runtime import session_alive
from .calls import bounded, libvirt, libvirt_qemu, version_string
from .drivers import compiled_in, driver_for
from .names import CLIENT, DOMAIN_PREFIX, owner
from .ssh_route import ssh_route
from .storage import HostStorage, StateCopy
from .teardown import drop_domain
from .uris import is_qemu_uri

log = logging.getLogger("pytest_vmfixtures")

LIBVIRT_LOG_DIR = Path("/var/log/libvirt/qemu")


@dataclass
class Host:
    """One libvirtd connection and the guests it runs."""

    uri: str
    conn: Any
    libvirt_version: str
    qemu_version: str
    machines: set[str] = field(default_factory=set)  # domains placed here by this run
    storage: HostStorage | None = None  # None: the host shares this machine's files
    down: str = ""  # why no more guests go there (its libvirtd stopped answering)
    machine: str = ""  # the hypervisor's hostname: private networks stay within one machine
    copies: dict[str, list[StateCopy]] = field(default_factory=dict)  # saved-state key -> RAM copies

    @property
    def running(self) -> int:
        return len(self.machines)


class HostUnreachable(GuestError):
    """A libvirt URI does not answer (at the start of the run, or any more)."""


def connection_lost(conn: Any) -> bool:
    try:
        return not conn.isAlive()
    except libvirt.libvirtError:
        return True


def is_session(uri: str) -> bool:
    """``qemu:///session``: the user's own libvirtd, whose QEMUs run as the user anyway."""
    return urlsplit(uri).path.rstrip("/") == "/session"


def log_dir(uri: str) -> Path:
    """Where libvirtd at ``uri`` (on this machine) writes its domains' QEMU logs."""
    if is_session(uri):
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "libvirt" / "qemu" / "log"
    return LIBVIRT_LOG_DIR


def shares_files(uri: str) -> bool:
    """Whether the libvirtd at ``uri`` runs on this machine and is reached over a unix socket.

    Only then are the cache's files usable in place and descriptors passable;
    every other transport is treated as another host, even one that loops back.
    """
    parts = urlsplit(uri)
    transport = parts.scheme.partition("+")[2]
    return transport in ("", "unix") and not parts.hostname


def connect(uri: str, pool_name: str) -> Host:
    """Open ``uri`` and check it can run saved-state mode's guests; a remote host's storage pool is opened too."""
    if not shares_files(uri):
        ssh_route(uri, 22)  # refuse now a host whose guests' SSH this machine could not reach
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise HostUnreachable(
            f"cannot connect to libvirt at {uri}: {exc.get_error_message()} "
            "(is libvirtd running? without systemd: virtlogd -d; libvirtd -d)"
        ) from exc
    try:
        if conn.getType() != "QEMU":
            raise GuestError(f"{uri} is a {conn.getType()} driver; the libvirt backend needs a qemu:// URI")
        if not hasattr(libvirt_qemu, "qemuMonitorCommandWithFiles") or conn.getLibVersion() < 8002000:
            raise GuestError(f"{uri}: libvirt >= 8.2 is needed (to hand QEMU a saved state through the monitor)")
        storage = None if shares_files(uri) else HostStorage(conn, uri, pool_name)
        return Host(uri, conn, version_string(conn.getLibVersion()), version_string(conn.getVersion()),
                    storage=storage, machine=str(conn.getHostname()))
    except BaseException:
        conn.close()
        raise


def connect_for_snapshots(uri: str) -> Host:
    """Open ``uri`` for snapshot mode: guests are reverted by the hypervisor's own snapshots, so any libvirt
    driver with the snapshot API will do (no QEMU monitor, no save format); its guests are reached on a
    libvirt network."""
    if not is_qemu_uri(uri):  # a driver this libvirt lacks, or one without snapshots: that host's tests fail alone
        driver = driver_for(uri)
        problem = compiled_in(uri) or (None if driver.snapshots else (
            f"{uri}: libvirt's {driver.title} driver has no snapshot API, so its guests cannot be reverted "
            "between tests; use another hypervisor host (see docs/libvirt.md)"))
        if problem:
            raise HostUnreachable(problem)
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise HostUnreachable(f"cannot connect to libvirt at {uri}: {exc.get_error_message()}") from exc
    try:
        if conn.getType() == "QEMU" and not shares_files(uri):
            raise GuestError(f"{uri}: snapshot mode on libvirt's QEMU driver runs on this machine's libvirtd "
                             "(qemu:///system or qemu:///session); for a remote QEMU host use --vm-libvirt-mode saved-state")
        try:
            hypervisor = version_string(conn.getVersion())
        except libvirt.libvirtError:
            hypervisor = "unknown"
        return Host(uri, conn, version_string(conn.getLibVersion()), hypervisor, machine=str(conn.getHostname()))
    except BaseException:
        conn.close()
        raise


def is_qemu_host(host: Host) -> bool:
    """Whether ``host`` is libvirt's QEMU driver (else an ESXi, Hyper-V, VirtualBox, VMware or test driver)."""
    try:
        return str(host.conn.getType()) == "QEMU"
    except libvirt.libvirtError:
        return True  # the connection is gone; what follows reports that


def versions_differ(hosts: list[Host]) -> str | None:
    """Why ``hosts`` cannot share saved states (their libvirt or QEMU versions differ), or None."""
    versions = {(h.libvirt_version, h.qemu_version) for h in hosts}
    if len(versions) <= 1:
        return None
    listing = ", ".join(f"{h.uri}: libvirt {h.libvirt_version}, QEMU {h.qemu_version}" for h in hosts)
    return f"libvirt hosts differ ({listing}); saved states load only on the same versions"


def pick_host(hosts: list[Host], name: str) -> Host:
    """The host for new domain ``name``: the least loaded one still up (ties go to the first URI).

    The caller holds the lock that guards the hosts' ``machines``.
    """
    usable = [h for h in hosts if not h.down]
    if not usable:
        reasons = "; ".join(f"{h.uri}: {h.down}" for h in hosts)
        raise HostUnreachable(f"no libvirt host is left to run guests ({reasons})")
    host = min(usable, key=lambda h: h.running)
    host.machines.add(name)
    return host


def reap(host: Host, alive: Callable[[str], bool] = lambda session: session_alive(Path("/nonexistent"), session)) -> None:
    """Destroy our domains whose session is gone (a killed run leaves them running).

    ``alive`` tells whether a session (``<pid>-<hex>``) still runs: the backend passes one that looks at
    the session's lock in its cache's ``run/`` (a pid alone says nothing of another pid namespace's runs;
    those have another client tag and are never touched here). Snapshot mode's domains are persistent:
    they are undefined too, with their snapshots.
    """
    try:
        domains = host.conn.listAllDomains(0)
    except libvirt.libvirtError:
        return
    for dom in domains:
        session = owner(dom.name())
        if session is not None and not alive(session):
            drop_domain(dom)
            with contextlib.suppress(OSError):
                (log_dir(host.uri) / f"{dom.name()}.log").unlink()
    if host.storage is not None:
        host.storage.reap(CLIENT, alive)


def sweep(host: Host, session_id: str, pool_name: str) -> None:
    """After losing ``host``: if its libvirtd is back, remove this run's domains and volumes there."""
    prefix = f"{DOMAIN_PREFIX}{session_id}-"
    try:
        conn = bounded(f"reconnecting to {host.uri}", lambda: libvirt.open(host.uri), 15.0)
    except Exception as exc:
        log.warning("libvirt at %s is still gone (%s); a later run reaps this run's domains there", host.uri, exc)
        return
    try:
        for domain in conn.listAllDomains(0):
            if str(domain.name()).startswith(prefix):
                drop_domain(domain)
        if host.storage is not None:
            storage = HostStorage(conn, host.uri, pool_name)
            for name in storage.names():
                if name.startswith(prefix):
                    storage.delete(name)
    except Exception as exc:
        log.warning("cleaning up on %s after it came back failed: %s", host.uri, exc)
    finally:
        with contextlib.suppress(Exception):
            conn.close()
