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
with the fewest running guests. Images and saved states are files of this
machine, so only libvirtds on this machine are accepted for now (a second
daemon with its own socket is fine); copying them to other hosts is not done.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import socket
import string
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

from ..accel import AccelChoice
from ..channels.agent import AgentError
from ..errors import BootError, GuestError, ImageError, QMPError, SnapshotError
from ..image import BuiltImage
from ..runtime import Runtime, pid_alive
from ..waiting import Deadline, wait_for
from .base import LanSegment, Machine, MachineConfig, SavedState
from .qemu import KERNEL_ARGS, TB_SIZE_MB, free_port, hotplug_lan, mac_for

try:
    import libvirt  # type: ignore[import-untyped]
    import libvirt_qemu  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - depends on the optional extra
    libvirt = None
    libvirt_qemu = None

DEFAULT_URI = "qemu:///system"
TEMPLATE = Path(__file__).with_name("domain.xml")
DEVICES_VERSION = 1  # bump when domain.xml's virtual hardware changes
DOMAIN_PREFIX = "vmfx-"
PORT_ATTEMPTS = 5
DEFAULT_TIMEOUT = 60.0
# libvirt's save image: magic, then 19 little-endian uint32 (version, xml length,
# was_running, compressed, cookie offset, 14 unused), then the XML, then QEMU's stream.
SAVE_MAGIC = b"LibvirtQemudSave"
SAVE_HEADER = struct.Struct("<16s5I56x")
QEMU_STREAM_MAGIC = b"QEVM"
# Our domains: vmfx-<pid>-<8 hex>-<label>; the pid names the pytest process that owns it.
OWNED = re.compile(r"^vmfx-(\d+)-[0-9a-f]{8}-")
LIBVIRT_LOG_DIR = Path("/var/log/libvirt/qemu")

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


def render_domain(values: dict[str, object]) -> str:
    """Fill in domain.xml; values are escaped, except the ones that are whole XML elements."""
    raw = {"tcg_features", "cpu", "incoming"}
    text = TEMPLATE.read_text()
    return string.Template(text).substitute(
        {k: (str(v) if k in raw else escape(str(v), {"'": "&apos;", '"': "&quot;"})) for k, v in values.items()}
    )


def save_image_stream_offset(path: Path) -> int:
    """Where QEMU's migration stream starts in a libvirt save image; checks the image is one we can load."""
    with open(path, "rb") as f:
        header = f.read(SAVE_HEADER.size)
        if len(header) < SAVE_HEADER.size:
            raise SnapshotError(f"{path} is too short to be a libvirt save image")
        magic, version, xml_len, _running, compressed, _cookie = SAVE_HEADER.unpack(header)
        if magic != SAVE_MAGIC:
            raise SnapshotError(f"{path} is not a libvirt save image (magic {magic!r})")
        if compressed:
            raise SnapshotError(
                f"{path} is compressed (save_image_format in qemu.conf); set it to raw and delete the saved state"
            )
        offset: int = SAVE_HEADER.size + int(xml_len)
        f.seek(offset)
        if f.read(4) != QEMU_STREAM_MAGIC:
            raise SnapshotError(f"{path}: no QEMU migration stream after libvirt's header (format version {version})")
    return offset


@dataclass
class Host:
    """One libvirtd connection and the guests it runs."""

    uri: str
    conn: Any
    libvirt_version: str
    qemu_version: str
    running: int = 0
    machines: set[str] = field(default_factory=set)


def is_local(uri: str) -> bool:
    host = urlsplit(uri).hostname
    return host in (None, "", "localhost", "127.0.0.1", "::1", socket.gethostname())


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
        has_agent: bool,
    ) -> None:
        self.backend = backend
        self.host = host
        self.domain = domain
        self.domain_name = str(domain.name())
        self.name = name
        self.files = files
        self.xml = xml
        self.ssh_host = "127.0.0.1"
        self.ssh_port = ssh_port
        self.console_log = files / "console.log"
        self.agent_socket: Path | None = None  # libvirt owns it; see agent_transport
        self.agent_transport = LibvirtAgentTransport(domain, name) if has_agent else None
        self.qmp = LibvirtQMP(domain, name)
        self._stopped = False
        self._lock = threading.Lock()

    @property
    def overlay(self) -> Path:
        return self.files / "overlay.qcow2"

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
        tail = self.log_tail(3)
        return f"libvirt domain {self.domain_name} on {self.host.uri} ended" + (f": {tail}" if tail else "")

    def log_tail(self, lines: int = 10) -> str:
        try:
            text = (LIBVIRT_LOG_DIR / f"{self.domain_name}.log").read_text(errors="replace")
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
        self.backend._forget(self)
        for path in (self.overlay, LIBVIRT_LOG_DIR / f"{self.domain_name}.log"):
            with contextlib.suppress(OSError):  # absent, or libvirt's log is not ours to remove
                path.unlink()


class LibvirtBackend:
    name = "libvirt"

    def __init__(
        self, runtime: Runtime, accel: AccelChoice, uris: list[str] | None = None, qemu_img: str = "qemu-img",
    ) -> None:
        _require_libvirt()
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors arrive as exceptions, not on stderr
        self.runtime = runtime
        self.accel = accel
        self.qemu_img = qemu_img
        self.hosts: list[Host] = []
        self._lock = threading.Lock()
        self._machines: dict[str, LibvirtMachine] = {}
        self._template_check()
        try:
            for uri in uris or [DEFAULT_URI]:
                self.hosts.append(self._connect(uri))
        except BaseException:
            self.close()
            raise
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
        if not is_local(uri):
            raise GuestError(
                f"libvirt URI {uri} is on another host, which cannot see this machine's image and state cache; "
                "copying images to remote hosts is not supported yet: use libvirtds on this machine"
            )
        try:
            conn = libvirt.open(uri)
        except libvirt.libvirtError as exc:
            raise GuestError(
                f"cannot connect to libvirt at {uri}: {exc.get_error_message()} "
                "(is libvirtd running? without systemd: virtlogd -d; libvirtd -d)"
            ) from exc
        try:
            if conn.getType() != "QEMU":
                raise GuestError(f"{uri} is a {conn.getType()} driver; the libvirt backend needs a qemu:// URI")
            if not hasattr(libvirt_qemu, "qemuMonitorCommandWithFiles") or conn.getLibVersion() < 8002000:
                raise GuestError(f"{uri}: libvirt >= 8.2 is needed (to hand QEMU a saved state through the monitor)")
            return Host(uri, conn, _version(conn.getLibVersion()), _version(conn.getVersion()))
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
            if match and not pid_alive(int(match.group(1)), None):
                with contextlib.suppress(libvirt.libvirtError):
                    dom.destroy()
                with contextlib.suppress(OSError):
                    (LIBVIRT_LOG_DIR / f"{dom.name()}.log").unlink()

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
            host = min(self.hosts, key=lambda h: h.running)  # least loaded; ties go to the first URI
            host.running += 1
            host.machines.add(name)
            return host

    def _release_host(self, host: Host, name: str) -> None:
        with self._lock:
            if name in host.machines:
                host.machines.discard(name)
                host.running -= 1

    def _forget(self, machine: LibvirtMachine) -> None:
        with self._lock:
            self._machines.pop(machine.domain_name, None)
        self._release_host(machine.host, machine.domain_name)

    def load(self) -> dict[str, int]:
        """Running guests per URI."""
        with self._lock:
            return {h.uri: h.running for h in self.hosts}

    # -- starting ------------------------------------------------------------
    def _overlay(self, backing: Path, overlay: Path) -> None:
        result = subprocess.run(
            [self.qemu_img, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(backing), str(overlay)],
            capture_output=True, text=True, timeout=60,
        )
        if result.returncode != 0:
            raise GuestError(f"cannot create overlay {overlay}: {result.stderr.strip()}")

    def domain_xml(
        self, image: BuiltImage, config: MachineConfig, domain_name: str, files: Path, ssh_port: int, incoming: bool,
    ) -> str:
        kvm = self.accel.accel == "kvm"
        if image.kernel is None:
            raise ImageError(f"{image.name} boots through firmware (your own image); use --vm-backend qemu for it")
        return render_domain({
            "domain_type": "kvm" if kvm else "qemu",
            "name": domain_name,
            "uuid": uuid.uuid4(),
            "memory_mb": config.memory_mb,
            "cpus": config.cpus,
            "kernel": image.kernel,
            "initrd": image.initrd,
            "cmdline": f"{image.cmdline} {KERNEL_ARGS}",
            "tcg_features": "" if kvm else f"<tcg><tb-cache unit='MiB'>{TB_SIZE_MB}</tb-cache></tcg>",
            "cpu": "<cpu mode='host-passthrough'/>" if kvm else "",
            "dac_label": f"+{os.getuid()}:+{os.getgid()}",
            "overlay": files / "overlay.qcow2",
            "console": files / "console.log",
            "restrict": "on" if config.network == "restricted" else "off",
            "ssh_port": ssh_port,
            "mac": mac_for(config.image),
            "incoming": "<qemu:arg value='-incoming'/><qemu:arg value='defer'/>" if incoming else "",
        })

    def _start(
        self, image: BuiltImage, config: MachineConfig, name: str, backing: Path, incoming: bool,
    ) -> LibvirtMachine:
        domain_name = f"{DOMAIN_PREFIX}{self.runtime.session_id}-{name}"
        files, _socks = self.runtime.machine_dirs(name)
        host = self._pick_host(domain_name)
        try:
            last_error = ""
            xml = ""
            for _ in range(PORT_ATTEMPTS):
                self._overlay(backing, files / "overlay.qcow2")
                port = free_port()
                xml = self.domain_xml(image, config, domain_name, files, port, incoming)
                flags = libvirt.VIR_DOMAIN_START_PAUSED if incoming else 0
                create = functools.partial(host.conn.createXML, xml, flags)
                try:
                    domain = _bounded(f"{name}: starting on {host.uri}", create, 120.0)
                except libvirt.libvirtError as exc:
                    last_error = str(exc.get_error_message())
                    if "host forwarding" in last_error or "hostfwd" in last_error:
                        continue  # the port was taken between our probe and QEMU's bind
                    break
                machine = LibvirtMachine(self, host, domain, name, files, port, xml, image.agent)
                with self._lock:
                    self._machines[domain_name] = machine
                return machine
            raise BootError(f"libvirt did not start {domain_name} on {host.uri}", console_tail=last_error,
                            command_line=["libvirt", host.uri, domain_name])
        except BaseException:
            self._release_host(host, domain_name)
            with contextlib.suppress(OSError):
                (files / "overlay.qcow2").unlink()
            raise

    def boot(self, image: BuiltImage, config: MachineConfig, name: str) -> LibvirtMachine:
        return self._start(image, config, name, image.disk, incoming=False)

    def restore(self, image: BuiltImage, config: MachineConfig, state: SavedState, name: str) -> LibvirtMachine:
        offset = save_image_stream_offset(state.memory)
        machine = self._start(image, config, name, state.disk, incoming=True)
        try:
            fd = os.open(state.memory, os.O_RDONLY)
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
            try:
                machine.domain.resume()  # through libvirt, so its idea of the domain's state stays right
            except libvirt.libvirtError as exc:
                raise SnapshotError(f"{name}: cannot resume the restored guest: {exc.get_error_message()}") from exc
            if machine.domain.state()[0] != libvirt.VIR_DOMAIN_RUNNING:
                raise SnapshotError(f"{name}: the restored guest is {machine.state()}, not running")
        except BaseException:
            machine.stop()
            raise
        return machine

    def save(self, machine: Machine, directory: Path) -> None:
        if not isinstance(machine, LibvirtMachine):
            raise TypeError(f"the libvirt backend cannot save {machine!r}")
        memory = directory / "memory"
        try:
            _bounded(f"{machine.name}: saving state", lambda: machine.domain.save(str(memory)), 600.0)
        except libvirt.libvirtError as exc:
            raise SnapshotError(f"{machine.name}: libvirt could not save the guest: {exc.get_error_message()}") from exc
        save_image_stream_offset(memory)  # fail now, not at the first restore
        info = memory.stat()
        if info.st_uid != os.getuid():
            try:
                os.chown(memory, os.getuid(), os.getgid())
            except OSError as exc:
                raise SnapshotError(f"{memory} belongs to uid {info.st_uid}, not to us, and cannot be chowned") from exc
        os.chmod(memory, 0o600)
        os.replace(machine.overlay, directory / "disk.qcow2")
        machine.stop()

    def attach_lan(self, machine: Machine, segment: LanSegment, mac: str) -> None:
        # libvirt cannot hot-plug an mcast interface, so the NIC goes in through the monitor;
        # the domain is transient and dropped at revert, so libvirt's view need not include it.
        hotplug_lan(machine, segment, mac)

    def close(self) -> None:
        with self._lock:
            machines = list(self._machines.values())
        for machine in machines:
            with contextlib.suppress(Exception):
                machine.stop()
        for host in self.hosts:
            with contextlib.suppress(Exception):
                host.conn.close()
        self.hosts = []

