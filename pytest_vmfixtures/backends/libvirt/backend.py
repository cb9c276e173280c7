"""The libvirt backend: guests are transient libvirt domains, on one host or several.

Same semantics as the QEMU backend: each guest runs on its own qcow2 overlay
over a read-only layer, with QEMU's user-mode network (``restrict=on`` by
default) forwarding one 127.0.0.1 port to sshd, and a ready state saved once
and restored many times, in parallel. The domain XML is the template
``domain.xml`` next to this file.

How a state is saved and restored, and why:

* save: ``virDomainSave`` writes libvirt's save image (a small header, the
  domain XML, then QEMU's migration stream) to ``memory``; the domain, being
  transient, is gone afterwards and its overlay becomes ``disk.qcow2``.
* restore: libvirt's own ``virDomainRestoreFlags`` only accepts a replacement
  XML with the *same UUID* ("Target domain uuid ... does not match source"),
  and one libvirtd never runs two domains with one UUID, so a saved file could
  back only one live guest at a time. The pool needs several (the guest in
  use and its spare). So each restore starts a new domain (own name, UUID,
  overlay, console, port) with QEMU's ``-incoming defer``, hands QEMU the save
  image's migration stream as a file descriptor through the monitor
  (``virDomainQemuMonitorCommandWithFiles``, libvirt >= 8.2), starts the
  incoming migration, and resumes the domain through libvirt once it loaded.

The guest agent's socket belongs to libvirt; commands reach the agent through
``virDomainQemuAgentCommand`` (:class:`LibvirtAgentTransport`), and QMP
through ``virDomainQemuMonitorCommand`` (:class:`LibvirtQMP`).

Several hosts: each URI is one libvirtd; a new guest goes to the connection
with the fewest running guests. A libvirtd reached over a unix socket shares
this machine's files (the cache is used in place, the saved RAM is handed over
as a descriptor). Any other transport (``qemu+ssh://``, ``+tcp``, ``+tls``,
``+ext``) is a *remote* host: images, kernels and saved states are copied into
its storage pool once and kept there by digest (libvirt_storage.py); guests
are restored by libvirt itself from a per-guest copy of the saved RAM with its
own UUID (libvirt_save.py); the serial console is streamed back over the
connection into the local console.log; SSH reaches the guest's forwarded port
on the host's loopback, through ``ssh -W`` for ``qemu+ssh://`` hosts.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import random
import re
import shlex
import shutil
import socket
import string
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape

from ..accel import AccelChoice
from ..channels.agent import AgentError
from ..errors import BootError, GuestError, ImageError, QMPError, SnapshotError
from ..images import qcow2
from ..images.image import BuiltImage
from ..options import DEFAULT_LIBVIRT_POOL, DEFAULT_LIBVIRT_URI
from ..runtime import Runtime, pid_alive
from ..waiting import Deadline, wait_for
from . import libvirt_save
from .base import LanSegment, Machine, MachineConfig, SavedState, start_restored_console
from .libvirt_storage import HostStorage, file_chunks
from .qemu import KERNEL_ARGS, TB_SIZE_MB, create_overlay, free_port, hotplug_lan, mac_for

try:
    import libvirt  # type: ignore[import-untyped]
    import libvirt_qemu  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - depends on the optional extra
    libvirt = None
    libvirt_qemu = None

log = logging.getLogger("pytest_vmfixtures")

TEMPLATE = Path(__file__).with_name("domain.xml")
DEVICES_VERSION = 1  # bump when domain.xml's virtual hardware changes
DOMAIN_PREFIX = "vmfx-"
PORT_ATTEMPTS = 5
DEFAULT_TIMEOUT = 60.0
# Our domains: vmfx-<pid>-<8 hex>-<client>-<label>: the pid of the pytest process that owns
# it, on the machine whose hostname hashes to <client> (hosts are shared between machines).
OWNED = re.compile(r"^vmfx-(\d+)-[0-9a-f]{8}-([0-9a-f]{8})-")
CLIENT = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
LIBVIRT_LOG_DIR = Path("/var/log/libvirt/qemu")
REMOTE_PORTS = (20000, 60000)  # ports on a remote host cannot be probed from here: pick, retry if taken
SSH_TRANSPORTS = {"ssh", "libssh", "libssh2"}

T = TypeVar("T")
_calls = ThreadPoolExecutor(max_workers=8, thread_name_prefix="vmfixtures-libvirt")


def _require_libvirt() -> None:
    if libvirt is None:
        raise GuestError("the libvirt backend needs libvirt-python: pip install 'pytest-vmfixtures[libvirt]'")


def _bounded(what: str, call: Callable[[], T], timeout: float) -> T:
    """Run a blocking libvirt call with a deadline (libvirt-python releases the GIL while it waits)."""
    future = _calls.submit(call)
    try:
        return future.result(timeout)
    except FutureTimeout:
        raise GuestError(f"{what} did not answer within {timeout:g} s") from None


def _version(number: int) -> str:
    return f"{number // 1000000}.{number // 1000 % 1000}.{number % 1000}"


@functools.cache
def _template() -> string.Template:
    return string.Template(TEMPLATE.read_text())


def render_domain(values: dict[str, object]) -> str:
    """Fill in domain.xml; values are escaped, except the ones that are whole XML elements."""
    raw = {"tcg_features", "cpu", "incoming", "seclabel", "serial"}
    return _template().substitute(
        {k: (str(v) if k in raw else escape(str(v), {"'": "&apos;", '"': "&quot;"})) for k, v in values.items()}
    )


@dataclass
class StateCopy:
    """A remote host's copy of a saved RAM state, under its own UUID; one guest restores from it at a time."""

    uuid: str
    name: str  # of the domain restored from it, and (+ ".save") of its volume
    path: str
    busy: bool = True


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


def ssh_route(uri: str, port: int) -> str | None:
    """How SSH reaches a guest's port forwarded on the host's loopback: None (directly) or a proxy command."""
    parts = urlsplit(uri)
    host = parts.hostname
    if host in (None, "", "localhost", "127.0.0.1", "::1", socket.gethostname()):
        return None
    if parts.scheme.partition("+")[2] not in SSH_TRANSPORTS:
        raise GuestError(
            f"guests on {uri} forward SSH to that host's loopback, which this machine reaches through ssh: "
            f"use qemu+ssh://{host}/system for it"
        )
    # The same credentials libvirt's own ssh uses for this URI (its keyfile and no_verify parameters).
    query = parse_qs(parts.query)
    argv = ["ssh", "-o", "BatchMode=yes", "-W", f"127.0.0.1:{port}"]
    if parts.port:
        argv += ["-p", str(parts.port)]
    if parts.username:
        argv += ["-l", parts.username]
    if "keyfile" in query:
        argv += ["-i", query["keyfile"][0]]
    if query.get("no_verify", ["0"])[0] == "1":
        argv += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
    return shlex.join([*argv, host])


def qcow2_virtual_size(path: Path) -> int:
    size = qcow2.virtual_size(path)
    if size is None:
        raise ImageError(f"{path} is not a qcow2 image")
    return size


class ConsolePump:
    """A remote guest's serial console, streamed over libvirt into a local file.

    The stream gets a connection of its own: a thread blocked reading it would
    otherwise hold up every other call on the guest's connection.
    """

    def __init__(self, uri: str, domain: Any, target: Path) -> None:
        self.conn = libvirt.open(uri)
        try:
            self.stream = self.conn.newStream(0)
            self.conn.lookupByUUIDString(domain.UUIDString()).openConsole(
                None, self.stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE
            )
        except BaseException:
            self.conn.close()
            raise
        self.target = target
        self._thread = threading.Thread(target=self._pump, name=f"console-{target.parent.name}", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        with open(self.target, "ab") as f:
            while True:
                try:
                    data = self.stream.recv(65536)
                except libvirt.libvirtError:
                    return  # the domain ended
                if isinstance(data, int) or not data:
                    return
                f.write(data)
                f.flush()

    def close(self) -> None:
        """After the domain is gone (which ends the stream)."""
        self._thread.join(timeout=10)
        with contextlib.suppress(Exception):
            _bounded("closing a console stream", self.conn.close, 10)


class LibvirtQMP:
    """``Machine.qmp`` through libvirt's monitor pass-through, with channels.qmp.QMP's interface."""

    def __init__(self, domain: Any, name: str) -> None:
        self.domain = domain
        self.name = name
        self._closed = False

    def connect(self, timeout: float = 10.0) -> None:
        """Nothing to open: libvirt holds the monitor."""

    def _run(self, command: str, message: dict[str, Any], timeout: float, files: list[int] | None = None) -> Any:
        if self._closed:
            raise GuestError(f"{self.name}: QMP handle is closed (the guest was reverted or stopped)")
        text = json.dumps(message)

        def call() -> str:
            if files is None:
                return str(libvirt_qemu.qemuMonitorCommand(self.domain, text, 0))
            out, _ = libvirt_qemu.qemuMonitorCommandWithFiles(self.domain, text, files, 0)
            return str(out)

        try:
            reply = json.loads(_bounded(f"{self.name}: QMP {command!r}", call, timeout))
        except libvirt.libvirtError as exc:
            raise GuestError(f"{self.name}: QMP {command!r} through libvirt failed: {exc.get_error_message()}") from exc
        if "error" in reply:
            error = reply["error"]
            raise QMPError(command, str(error.get("class", "GenericError")), str(error.get("desc", error)))
        return reply.get("return")

    def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = DEFAULT_TIMEOUT) -> Any:
        """Run one QMP command; a QMP error raises :class:`QMPError` with QEMU's words."""
        message: dict[str, Any] = {"execute": command}
        if arguments is not None:
            message["arguments"] = arguments
        return self._run(command, message, timeout)

    def human(self, command_line: str, timeout: float = DEFAULT_TIMEOUT) -> str:
        """Run an HMP command (savevm, loadvm, ...); its text output is its only error channel."""
        return str(self.execute("human-monitor-command", {"command-line": command_line}, timeout))

    def send_fd(self, fd: int, fdname: str) -> None:
        """Hand QEMU an open file under ``fdname`` (libvirt passes it along with the command)."""
        self._run("getfd", {"execute": "getfd", "arguments": {"fdname": fdname}}, 10.0, files=[fd])

    def close(self) -> None:
        self._closed = True


# libvirt errors after which the agent channel is not trusted until connect() again.
BROKEN_AGENT = (
    {libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_NO_DOMAIN}
    if libvirt is not None else set()
)


class LibvirtAgentTransport:
    """Agent requests through ``virDomainQemuAgentCommand``; libvirt re-synchronises the channel itself."""

    def __init__(self, domain: Any, name: str) -> None:
        self.domain = domain
        self.name = name
        self._connected = False

    @property
    def connected(self) -> bool:
        return self._connected

    def connect(self, timeout: float) -> None:
        """Until the agent answers a ping.

        Right after a restore libvirt may still consider the agent's port closed: it
        learns that the guest has it open from an event QEMU sends once the saved
        state is loaded, so "not connected" is retried briefly.
        """
        deadline = Deadline(timeout)
        while True:
            self._connected = True
            try:
                self.call("guest-ping", None, max(1.0, deadline.remaining()))
                return
            except AgentError as exc:
                self._connected = False
                cause = exc.__cause__
                not_yet = isinstance(cause, libvirt.libvirtError) and (
                    cause.get_error_code() == libvirt.VIR_ERR_AGENT_UNRESPONSIVE and "not connected" in str(cause)
                )
                if not not_yet or deadline.remaining() <= 0.05:
                    raise
            time.sleep(0.02)

    def call(self, command: str, arguments: dict[str, Any] | None, timeout: float) -> Any:
        if not self._connected:
            raise AgentError(f"{self.name}: guest agent is not connected")
        message: dict[str, Any] = {"execute": command}
        if arguments is not None:
            message["arguments"] = arguments
        text = json.dumps(message)
        seconds = max(1, math.ceil(timeout))
        try:
            out = _bounded(
                f"{self.name}: guest agent {command!r}",
                lambda: libvirt_qemu.qemuAgentCommand(self.domain, text, seconds, 0),
                seconds + 5,
            )
        except GuestError as exc:
            self._connected = False
            raise AgentError(str(exc)) from exc
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in BROKEN_AGENT:
                self._connected = False  # no answer, or no domain: start over next time
            raise AgentError(f"{self.name}: guest agent {command!r} failed: {exc.get_error_message()}") from exc
        try:
            reply = json.loads(out)
        except (TypeError, ValueError) as exc:
            raise AgentError(f"{self.name}: guest agent sent garbage: {str(out)[:80]!r}") from exc
        if isinstance(reply, dict) and "error" in reply:
            error = reply["error"]
            raise AgentError(f"{self.name}: guest agent {command!r} failed: {error.get('desc', error)}")
        return reply.get("return") if isinstance(reply, dict) else None

    def close(self) -> None:
        self._connected = False


class LibvirtMachine:
    """A transient libvirt domain and the files it owns."""

    def __init__(
        self, backend: LibvirtBackend, host: Host, domain: Any, name: str, files: Path, ssh_port: int, xml: str,
        has_agent: bool, backing: Path, overlay: str,
    ) -> None:
        self.backend = backend
        self.host = host
        self.domain = domain
        self.domain_name = str(domain.name())
        self.placed_as = self.domain_name  # the name the backend placed it under (see _restore_copy)
        self.name = name
        self.files = files
        self.xml = xml
        self.ssh_host = "127.0.0.1"
        self.ssh_port = ssh_port
        self.ssh_proxy = ssh_route(host.uri, ssh_port) if host.storage is not None else None
        self.console_log = files / "console.log"
        self.agent_socket: Path | None = None  # libvirt owns it; see agent_transport
        self.agent_transport = LibvirtAgentTransport(domain, name) if has_agent else None
        self.qmp = LibvirtQMP(domain, name)
        self.backing = backing  # the local file this guest's disk layer sits on
        self.overlay = overlay  # a path on the host: a file here, or a volume in a remote host's pool
        self.console: ConsolePump | None = None
        self.state_copy: StateCopy | None = None
        self._stopped = False
        self._lock = threading.Lock()

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
            return bool(self.domain.isActive())
        except libvirt.libvirtError:
            return False  # a transient domain that ended is gone

    def exit_description(self) -> str:
        if self.alive():
            return "still running"
        if connection_lost(self.host.conn):
            return (f"the connection to libvirt at {self.host.uri} was lost (libvirtd stopped or the host is "
                    f"unreachable); domain {self.domain_name} may still run there until a later run reaps it")
        tail = self.log_tail(3)
        return f"libvirt domain {self.domain_name} on {self.host.uri} ended" + (f": {tail}" if tail else "")

    def log_tail(self, lines: int = 10) -> str:
        if self.host.storage is not None:
            return ""  # libvirt's log of the domain is on the other host
        try:
            text = (log_dir(self.host.uri) / f"{self.domain_name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def state(self) -> str:
        """libvirt's view: running, paused, shut off, ..."""
        try:
            code = self.domain.state()[0]
        except libvirt.libvirtError:
            return "gone"
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
        with contextlib.suppress(libvirt.libvirtError):  # already gone (saved, crashed, destroyed by someone)
            self.domain.destroy()
        if self.console is not None:
            self.console.close()
        self.backend._forget(self)
        if self.host.storage is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self.host.storage.delete(Path(self.overlay).name)
            return
        for path in (Path(self.overlay), log_dir(self.host.uri) / f"{self.domain_name}.log"):
            with contextlib.suppress(OSError):  # absent, or libvirt's log is not ours to remove
                path.unlink()


class LibvirtBackend:
    name = "libvirt"

    def __init__(
        self, runtime: Runtime, accel: AccelChoice, uris: list[str] | None = None, qemu_img: str = "qemu-img",
        pool: str = DEFAULT_LIBVIRT_POOL, progress: Callable[[str], None] = lambda message: None,
    ) -> None:
        _require_libvirt()
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors arrive as exceptions, not on stderr
        self.runtime = runtime
        self.accel = accel
        self.qemu_img = qemu_img
        self.pool_name = pool
        self.progress = progress
        self.hosts: list[Host] = []
        self._lock = threading.Lock()
        self._machines: dict[str, LibvirtMachine] = {}
        self._copy_ids = itertools.count()
        self._segments: dict[LanSegment, Host] = {}  # each private network's first member's host
        self._template_check()
        unreachable: list[str] = []
        try:
            for uri in uris or [DEFAULT_LIBVIRT_URI]:
                try:
                    self.hosts.append(self._connect(uri))
                except HostUnreachable as exc:
                    unreachable.append(str(exc))
            if not self.hosts:
                raise HostUnreachable("; ".join(unreachable))
        except BaseException:
            self.close()
            raise
        for reason in unreachable:  # the other hosts take the guests
            log.warning("%s; placing guests on the other libvirt hosts", reason)
            self.progress(f"{reason}; placing guests on the other libvirt hosts")
        versions = {(h.libvirt_version, h.qemu_version) for h in self.hosts}
        if len(versions) > 1:
            listing = ", ".join(f"{h.uri}: libvirt {h.libvirt_version}, QEMU {h.qemu_version}" for h in self.hosts)
            self.close()
            raise GuestError(f"libvirt hosts differ ({listing}); saved states load only on the same versions")
        for host in self.hosts:
            self._reap(host)

    @staticmethod
    def _template_check() -> None:
        if not TEMPLATE.is_file():
            raise GuestError(f"the libvirt domain template {TEMPLATE} is missing (broken installation)")

    def _connect(self, uri: str) -> Host:
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
            storage = None if shares_files(uri) else HostStorage(conn, uri, self.pool_name)
            return Host(uri, conn, _version(conn.getLibVersion()), _version(conn.getVersion()), storage=storage,
                        machine=str(conn.getHostname()))
        except BaseException:
            conn.close()
            raise

    def _reap(self, host: Host) -> None:
        """Destroy our domains whose pytest process is gone (a killed run leaves them running)."""
        try:
            domains = host.conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_TRANSIENT)
        except libvirt.libvirtError:
            return
        for dom in domains:
            match = OWNED.match(dom.name())
            if match and match.group(2) == CLIENT and not pid_alive(int(match.group(1)), None):
                with contextlib.suppress(libvirt.libvirtError):
                    dom.destroy()
                with contextlib.suppress(OSError):
                    (log_dir(host.uri) / f"{dom.name()}.log").unlink()
        if host.storage is not None:
            host.storage.reap(CLIENT)

    def describe(self) -> str:
        host = self.hosts[0]
        where = ", ".join(h.uri for h in self.hosts)
        return f"libvirt {host.libvirt_version} ({where}), qemu {host.qemu_version}, accel {self.accel.accel}"

    def state_inputs(self, image: BuiltImage, config: MachineConfig) -> dict[str, object]:
        host = self.hosts[0]
        return {
            "backend": "libvirt",
            "libvirt": host.libvirt_version,
            "qemu": host.qemu_version,
            "accel": self.accel.accel,
            "tb": TB_SIZE_MB,
            "kernel_args": KERNEL_ARGS,
            "devices": DEVICES_VERSION,
        }

    # -- placement ---------------------------------------------------------
    def _pick_host(self, name: str) -> Host:
        with self._lock:
            usable = [h for h in self.hosts if not h.down]
            if not usable:
                reasons = "; ".join(f"{h.uri}: {h.down}" for h in self.hosts)
                raise HostUnreachable(f"no libvirt host is left to run guests ({reasons})")
            host = min(usable, key=lambda h: h.running)  # least loaded; ties go to the first URI
            host.machines.add(name)
            return host

    def _release_host(self, host: Host, name: str) -> None:
        with self._lock:
            host.machines.discard(name)

    def _forget(self, machine: LibvirtMachine) -> None:
        with self._lock:
            self._machines.pop(machine.placed_as, None)
            if machine.state_copy is not None:
                machine.state_copy.busy = False
        self._release_host(machine.host, machine.placed_as)

    def load(self) -> dict[str, int]:
        """Running guests per URI."""
        with self._lock:
            return {h.uri: h.running for h in self.hosts}

    # -- starting ------------------------------------------------------------
    def _qemu_img(self, *args: str) -> None:
        result = subprocess.run([self.qemu_img, *args], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise GuestError(f"qemu-img {args[0]} failed: {result.stderr.strip()}")

    def domain_xml(
        self, image: BuiltImage, config: MachineConfig, domain_name: str, host: Host, paths: dict[str, object],
        ssh_port: int, incoming: bool, domain_uuid: str | None = None,
    ) -> str:
        """``paths``: kernel, initrd, overlay as the host sees them; console (local hosts only)."""
        kvm = self.accel.accel == "kvm"
        if image.kernel is None:
            raise ImageError(f"{image.name} boots through firmware (your own image); use --vm-backend qemu for it")
        local = host.storage is None
        append = " append='on'" if incoming else ""
        return render_domain({
            "domain_type": "kvm" if kvm else "qemu",
            "name": domain_name,
            "uuid": domain_uuid or uuid.uuid4(),
            "memory_mb": config.memory_mb,
            "cpus": config.cpus,
            "kernel": paths["kernel"],
            "initrd": paths["initrd"],
            "cmdline": f"{image.cmdline} {KERNEL_ARGS}",
            "tcg_features": "" if kvm else f"<tcg><tb-cache unit='MiB'>{TB_SIZE_MB}</tb-cache></tcg>",
            "cpu": "<cpu mode='host-passthrough'/>" if kvm else "",
            # Here QEMU runs as the user running the tests, and libvirt leaves our files' owners
            # alone (a session libvirtd has no DAC driver: its QEMUs are the user's already); on a
            # remote host, QEMU runs as that host's libvirt is configured to run it.
            "seclabel": (f"<seclabel type='static' model='dac' relabel='no'><label>+{os.getuid()}:+{os.getgid()}"
                         "</label></seclabel>") if local and not is_session(host.uri) else "",
            "overlay": paths["overlay"],
            # Here the console goes to a file; from a remote host it is streamed back (ConsolePump).
            # A restore appends to the log its state's boot console begins (start_restored_console).
            "serial": (f"<serial type='file'><source path='{escape(str(paths['console']))}'{append}/>"
                       "<target port='0'/></serial>"
                       if local else "<serial type='pty'><target port='0'/></serial>"),
            "restrict": "on" if config.network == "restricted" else "off",
            "ssh_port": ssh_port,
            "mac": mac_for(config.image),
            "incoming": "<qemu:arg value='-incoming'/><qemu:arg value='defer'/>" if incoming else "",
        })

    def _host_files(self, host: Host, image: BuiltImage, backing: Path, overlay_name: str, files: Path,
                    state: SavedState | None) -> dict[str, object]:
        """Where the host finds this guest's kernel, initrd and (new) overlay; remote hosts get copies first."""
        storage = host.storage
        if storage is None:
            create_overlay(self.qemu_img, backing, files / overlay_name)
            return {"kernel": image.kernel, "initrd": image.initrd, "overlay": files / overlay_name,
                    "console": files / "console.log"}
        assert image.kernel is not None and image.initrd is not None
        tag = f"vmfx-img-{image.disk_sha256[:16]}"

        def local_file(path: Path) -> Callable[[], tuple[Iterator[bytes], int]]:
            return lambda: (file_chunks(path), path.stat().st_size)

        paths: dict[str, object] = {
            "kernel": storage.ensure(f"{tag}.vmlinuz", local_file(image.kernel), self.progress),
            "initrd": storage.ensure(f"{tag}.initrd", local_file(image.initrd), self.progress),
        }
        remote_backing = storage.ensure(f"{tag}.qcow2", local_file(image.disk), self.progress)
        if state is not None:
            remote_backing = self._remote_state_disk(storage, state, remote_backing, files)
        paths["overlay"] = storage.overlay(overlay_name, remote_backing, qcow2_virtual_size(backing))
        return paths

    def _remote_state_disk(self, storage: HostStorage, state: SavedState, base: str, files: Path) -> str:
        """The saved state's disk layer on a remote host, pointing at that host's copy of the image."""
        rebased = files / "state-disk.qcow2"

        def source() -> tuple[Iterator[bytes], int]:
            shutil.copyfile(state.disk, rebased)
            self._qemu_img("rebase", "-u", "-F", "qcow2", "-b", base, str(rebased))
            return file_chunks(rebased), rebased.stat().st_size

        try:
            return storage.ensure(f"vmfx-state-{state.key}.qcow2", source, self.progress)
        finally:
            with contextlib.suppress(OSError):
                rebased.unlink()

    def _start(
        self, image: BuiltImage, config: MachineConfig, name: str, backing: Path, state: SavedState | None,
    ) -> LibvirtMachine:
        """Start a domain: booting (``state`` None) or restoring ``state`` (paused; the caller loads and resumes).

        A host whose libvirtd stops answering is marked down and the guest goes to another one.
        """
        domain_name = f"{DOMAIN_PREFIX}{self.runtime.session_id}-{CLIENT}-{name}"
        while True:
            host = self._pick_host(domain_name)
            try:
                return self._start_on(host, image, config, name, domain_name, backing, state)
            except Exception as exc:
                if not self._mark_if_down(host, exc):
                    raise

    def _mark_if_down(self, host: Host, exc: BaseException) -> bool:
        """Whether ``exc`` came from losing ``host``; if so no more guests go there."""
        if not connection_lost(host.conn):
            return False
        with self._lock:
            if not host.down:
                host.down = f"connection lost ({exc})"
                log.warning("libvirt at %s stopped answering; placing guests on the other hosts", host.uri)
                self.progress(f"libvirt at {host.uri} stopped answering; placing guests on the other hosts")
        return True

    def _start_on(
        self, host: Host, image: BuiltImage, config: MachineConfig, name: str, domain_name: str, backing: Path,
        state: SavedState | None,
    ) -> LibvirtMachine:
        files, _socks = self.runtime.machine_dirs(name)
        overlay_name = f"{domain_name}.qcow2" if host.storage is not None else "overlay.qcow2"
        paths: dict[str, object] = {}
        try:
            paths = self._host_files(host, image, backing, overlay_name, files, state)
            if state is not None:
                start_restored_console(state, files / "console.log")
            last_error = ""
            xml = ""
            for _ in range(PORT_ATTEMPTS):
                port = free_port() if host.storage is None else random.randrange(*REMOTE_PORTS)
                copy: StateCopy | None = None
                try:
                    if host.storage is not None and state is not None:
                        domain, xml, copy = self._restore_copy(host, image, config, paths, port, state)
                    else:
                        xml = self.domain_xml(image, config, domain_name, host, paths, port, incoming=state is not None)
                        paused = state is not None or host.storage is not None
                        create = functools.partial(host.conn.createXML, xml, libvirt.VIR_DOMAIN_START_PAUSED if paused else 0)
                        domain = _bounded(f"{name}: starting on {host.uri}", create, 120.0)
                except libvirt.libvirtError as exc:
                    last_error = str(exc.get_error_message())
                    if "host forwarding" in last_error or "hostfwd" in last_error:
                        continue  # the port was taken between our choice and QEMU's bind
                    break
                machine = LibvirtMachine(self, host, domain, name, files, port, xml, image.agent, backing,
                                         str(paths["overlay"]))
                machine.placed_as = domain_name
                machine.state_copy = copy
                with self._lock:
                    self._machines[domain_name] = machine
                if host.storage is not None:
                    self._attach_console(machine, resume=state is None)
                return machine
            raise BootError(f"libvirt did not start {domain_name} on {host.uri}", console_tail=last_error,
                            command_line=["libvirt", host.uri, domain_name])
        except BaseException:
            self._release_host(host, domain_name)
            self._drop_overlay(host, overlay_name, files)
            raise

    def _drop_overlay(self, host: Host, overlay_name: str, files: Path) -> None:
        if host.storage is not None:
            with contextlib.suppress(Exception):
                host.storage.delete(overlay_name)
        else:
            with contextlib.suppress(OSError):
                (files / overlay_name).unlink()

    def _attach_console(self, machine: LibvirtMachine, resume: bool) -> None:
        """Stream a remote guest's console here before it runs, so its first words are kept."""
        try:
            machine.console = ConsolePump(machine.host.uri, machine.domain, machine.console_log)
            if resume:
                machine.domain.resume()
        except BaseException:
            machine.stop()
            raise

    def _restore_copy(
        self, host: Host, image: BuiltImage, config: MachineConfig, paths: dict[str, object], port: int,
        state: SavedState,
    ) -> tuple[Any, str, StateCopy]:
        """Restore ``state`` on a remote host through libvirt, from a RAM copy nobody else is using.

        libvirt wants the restored domain to keep the save image's name and UUID, so
        the domain is named after the copy (still with the session id in it).
        """
        assert host.storage is not None
        copy = self._free_copy(host, state, image, config, paths)
        xml = self.domain_xml(image, config, copy.name, host, paths, port, incoming=False, domain_uuid=copy.uuid)
        try:
            restore = functools.partial(host.conn.restoreFlags, copy.path, xml, libvirt.VIR_DOMAIN_SAVE_PAUSED)
            _bounded(f"{copy.name}: restoring on {host.uri}", restore, 300.0)
            domain = host.conn.lookupByName(copy.name)
        except BaseException:
            copy.busy = False
            raise
        return domain, xml, copy

    def _free_copy(
        self, host: Host, state: SavedState, image: BuiltImage, config: MachineConfig, paths: dict[str, object],
    ) -> StateCopy:
        with self._lock:
            copies = host.copies.setdefault(state.key, [])
            for copy in copies:
                if not copy.busy:
                    copy.busy = True
                    return copy
            name = f"{DOMAIN_PREFIX}{self.runtime.session_id}-{CLIENT}-{state.key}-{next(self._copy_ids)}"
            copy = StateCopy(str(uuid.uuid4()), name, "")
            copies.append(copy)  # busy while it uploads
        assert host.storage is not None
        try:
            header_xml = self.domain_xml(image, config, name, host, paths, 22, incoming=False, domain_uuid=copy.uuid)
            chunks, size = libvirt_save.rewrap(state.memory, header_xml)
            copy.path = host.storage.upload(f"{name}.save", chunks, size)
        except BaseException:
            with self._lock:
                copies.remove(copy)
            raise
        return copy

    def boot(self, image: BuiltImage, config: MachineConfig, name: str) -> LibvirtMachine:
        return self._start(image, config, name, image.disk, None)

    def restore(self, image: BuiltImage, config: MachineConfig, state: SavedState, name: str) -> LibvirtMachine:
        offset = libvirt_save.stream_offset(state.memory)
        machine = self._start(image, config, name, state.disk, state)
        try:
            if machine.host.storage is None:  # else libvirt loaded it already (_restore_copy)
                self._load_through_monitor(machine, state.memory, offset)
            try:
                machine.domain.resume()  # through libvirt, so its idea of the domain's state stays right
            except libvirt.libvirtError as exc:
                raise SnapshotError(f"{name}: cannot resume the restored guest: {exc.get_error_message()}") from exc
            if machine.domain.state()[0] != libvirt.VIR_DOMAIN_RUNNING:
                raise SnapshotError(f"{name}: the restored guest is {machine.state()}, not running")
        except BaseException as exc:
            machine.stop()
            self._mark_if_down(machine.host, exc)
            raise
        return machine

    @staticmethod
    def _load_through_monitor(machine: LibvirtMachine, memory: Path, offset: int) -> None:
        name = machine.name
        fd = os.open(memory, os.O_RDONLY)
        try:
            os.lseek(fd, offset, os.SEEK_SET)
            machine.qmp.send_fd(fd, "state")
        finally:
            os.close(fd)
        machine.qmp.execute("migrate-incoming", {"uri": "fd:state"})

        def loaded() -> bool | None:
            if not machine.alive():
                raise SnapshotError(f"{name}: saved state did not load: {machine.exit_description()}")
            status = machine.qmp.execute("query-status")["status"]
            if status in ("inmigrate", "prelaunch"):
                return None
            if status not in ("paused", "running"):
                info = machine.qmp.execute("query-migrate")
                raise SnapshotError(f"{name}: loading the saved state ended in {status}: {info}")
            return True

        wait_for(f"{name}: loading saved state", loaded, 120.0, interval=0.01, error=SnapshotError)

    def save(self, machine: Machine, directory: Path) -> None:
        if not isinstance(machine, LibvirtMachine):
            raise TypeError(f"the libvirt backend cannot save {machine!r}")
        memory = directory / "memory"
        storage = machine.host.storage
        target = str(memory) if storage is None else f"{storage.directory}/{machine.domain_name}.save"
        try:
            _bounded(f"{machine.name}: saving state", lambda: machine.domain.save(target), 600.0)
        except libvirt.libvirtError as exc:
            raise SnapshotError(f"{machine.name}: libvirt could not save the guest: {exc.get_error_message()}") from exc
        if storage is not None:
            self._fetch_saved(machine, storage, directory)
        libvirt_save.stream_offset(memory)  # fail now, not at the first restore
        info = memory.stat()
        if info.st_uid != os.getuid():
            try:
                os.chown(memory, os.getuid(), os.getgid())
            except OSError as exc:
                raise SnapshotError(f"{memory} belongs to uid {info.st_uid}, not to us, and cannot be chowned") from exc
        os.chmod(memory, 0o600)
        if storage is None:
            os.replace(machine.overlay, directory / "disk.qcow2")
        machine.stop()

    def _fetch_saved(self, machine: LibvirtMachine, storage: HostStorage, directory: Path) -> None:
        """Bring a state saved on a remote host into the local cache, its disk layer over the local image."""
        saved = f"{machine.domain_name}.save"
        try:
            storage.refresh()  # the save file appeared behind libvirt's back
            storage.download(saved, directory / "memory")
            storage.download(Path(machine.overlay).name, directory / "disk.qcow2")
        finally:
            storage.delete(saved)
        self._qemu_img("rebase", "-u", "-F", "qcow2", "-b", str(machine.backing), str(directory / "disk.qcow2"))

    def keep(self, machine: Machine) -> None:
        """close() leaves it running; it carries this run's pid, so a later run's reaper ends it."""
        if isinstance(machine, LibvirtMachine):
            with self._lock:
                self._machines.pop(machine.placed_as, None)

    def attach_lan(self, machine: Machine, segment: LanSegment, mac: str) -> None:
        # libvirt cannot hot-plug an mcast interface, so the NIC goes in through the monitor;
        # the domain is transient and dropped at revert, so libvirt's view need not include it.
        if isinstance(machine, LibvirtMachine):
            with self._lock:
                first = self._segments.setdefault(segment, machine.host)
            if first.machine != machine.host.machine:
                raise GuestError(
                    f"{machine.name} runs on {machine.host.uri} ({machine.host.machine}), the other guests of this "
                    f"vm_network on {first.uri} ({first.machine}): a private network is multicast on one "
                    "hypervisor's loopback and cannot span machines; run such tests with one --vm-libvirt-uri"
                )
        hotplug_lan(machine, segment, mac)

    def _sweep(self, host: Host) -> None:
        """After losing ``host``: if its libvirtd is back, remove this run's domains and volumes there."""
        prefix = f"{DOMAIN_PREFIX}{self.runtime.session_id}-"
        try:
            conn = _bounded(f"reconnecting to {host.uri}", lambda: libvirt.open(host.uri), 15.0)
        except Exception as exc:
            log.warning("libvirt at %s is still gone (%s); a later run reaps this run's domains there", host.uri, exc)
            return
        try:
            for domain in conn.listAllDomains(0):
                if str(domain.name()).startswith(prefix):
                    with contextlib.suppress(libvirt.libvirtError):
                        domain.destroy()
            if host.storage is not None:
                storage = HostStorage(conn, host.uri, self.pool_name)
                for name in storage.names():
                    if name.startswith(prefix):
                        storage.delete(name)
        except Exception as exc:
            log.warning("cleaning up on %s after it came back failed: %s", host.uri, exc)
        finally:
            with contextlib.suppress(Exception):
                conn.close()

    def close(self) -> None:
        with self._lock:
            machines = list(self._machines.values())
        for machine in machines:
            with contextlib.suppress(Exception):
                machine.stop()
        for host in self.hosts:
            if host.down:
                self._sweep(host)
            for copies in host.copies.values():
                for copy in copies:
                    with contextlib.suppress(Exception):
                        host.storage.delete(f"{copy.name}.save")  # type: ignore[union-attr]
            host.copies.clear()
        for host in self.hosts:
            with contextlib.suppress(Exception):
                host.conn.close()
        self.hosts = []

