"""SSH to a guest with paramiko, the host key pinned.

The image build generates the guest's only host key, so the client knows it
in advance and rejects anything else (no AutoAddPolicy, no known_hosts file).
"""

from __future__ import annotations

import base64
import contextlib
import select
import shlex
import socket
import subprocess
import tempfile
import threading
import time

import paramiko

from ..command import CommandResult, kill_script, ssh_command_line
from ..errors import CommandTimeout, GuestError
from ..waiting import Deadline


class SSHError(GuestError):
    """SSH to the guest failed or dropped."""


class HostKeyError(SSHError):
    """A host key did not verify (the guest's pinned key, or the hypervisor's on an ``ssh -W`` route); not retried."""


def parse_host_key(line: str) -> paramiko.PKey:
    """Parse an ``ssh-ed25519 AAAA...`` public key line."""
    try:
        kind, blob = line.split()[:2]
        return paramiko.PKey.from_type_string(kind, base64.b64decode(blob))
    except (ValueError, paramiko.SSHException) as exc:
        raise SSHError(f"malformed pinned host key {line[:40]!r}: rebuild the image") from exc


class ProxyProcess:
    """A command (``ssh -W host:port hypervisor``) whose stdin and stdout are one end of a socket pair.

    paramiko gets the other end as an ordinary socket; closing it ends the command, which is reaped.
    """

    def __init__(self, command: str) -> None:
        self.sock, theirs = socket.socketpair()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115  # lives as long as the process
        try:
            self.process = subprocess.Popen(
                shlex.split(command), stdin=theirs.fileno(), stdout=theirs.fileno(), stderr=self._stderr,
                start_new_session=True,
            )
        except OSError as exc:
            self.sock.close()
            self._stderr.close()
            raise SSHError(f"cannot run the SSH proxy command {command!r}: {exc}") from exc
        finally:
            theirs.close()

    def errors(self) -> str:
        """What the command said on stderr (why the hypervisor refused, say)."""
        with contextlib.suppress(OSError, ValueError):
            self._stderr.seek(0)
            return self._stderr.read().decode(errors="replace").strip()[-500:]
        return ""

    def close(self) -> None:
        self.sock.close()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self._stderr.close()


IDENTITY_SECONDS = 30.0
MAX_OUTPUT_BYTES = 64 << 20  # of a command's stdout, and of its stderr, kept on the host (the tail)
MAX_IDENTITY_BYTES = 4096


def keep_tail(captured: bytearray, data: bytes) -> None:
    """Add ``data`` to ``captured``, keeping its last MAX_OUTPUT_BYTES: a command that prints without end
    (faster than it is read, too) keeps its tail, not all of it."""
    captured += data
    if len(captured) > MAX_OUTPUT_BYTES:
        del captured[: len(captured) - MAX_OUTPUT_BYTES]


def check_nic(client: paramiko.SSHClient, mac: str, name: str, host_id: str) -> None:
    """Refuse a guest that is not ``name``: it must have a NIC with ``mac``, the MAC the hypervisor gave ``name``.

    Guests of one image share their host key and accept the same client key, so on a shared network
    the key alone cannot tell them apart: another guest that took ``name``'s address would be let in.
    """
    try:
        _stdin, stdout, _stderr = client.exec_command("cat /sys/class/net/*/address", timeout=IDENTITY_SECONDS)
        stdout.channel.settimeout(IDENTITY_SECONDS)
        macs = stdout.read(MAX_IDENTITY_BYTES).decode("ascii", errors="replace").lower().split()
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise SSHError(f"{name}: cannot check that SSH to {host_id} reached {name} (its NICs): {exc}") from exc
    if mac.lower() not in macs:
        raise SSHError(f"{name}: SSH to {host_id} reached another machine (NICs {', '.join(macs) or 'none'}, not "
                       f"{name}'s {mac.lower()}): its address was taken by another guest; refusing to use it")


class SSH:
    def __init__(
        self, host: str, port: int, user: str, key: paramiko.PKey, host_key: str, name: str, proxy: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.proxy = proxy  # reach host:port through this command's stdin/stdout (ssh -W through a hypervisor)
        self.user = user
        self.key = key
        self.host_key = host_key
        self.name = name
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._proxy: ProxyProcess | None = None
        self.sudo = False  # run commands as root through sudo -n (the login user is not root)
        self.mac: str | None = None  # if set: the guest must have a NIC with this MAC (check_nic), checked on connect

    def connect(self, timeout: float = 10.0) -> paramiko.SSHClient:
        self.close()
        client = paramiko.SSHClient()
        pinned = parse_host_key(self.host_key)
        host_id = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
        self._proxy = ProxyProcess(self.proxy) if self.proxy else None
        client.get_host_keys().add(host_id, pinned.get_name(), pinned)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(
                self.host,
                port=self.port,
                username=self.user,
                pkey=self.key,
                look_for_keys=False,
                allow_agent=False,
                timeout=timeout,
                banner_timeout=timeout,
                auth_timeout=timeout,
                sock=self._proxy.sock if self._proxy else None,
            )
        except paramiko.BadHostKeyException as exc:
            client.close()
            self.close()
            raise HostKeyError(f"{self.name}: host key mismatch on {host_id}; refusing to connect") from exc
        except (paramiko.SSHException, OSError, EOFError) as exc:
            client.close()
            how = f" (through {self.proxy}: {self._proxy.errors()})" if self._proxy else ""
            if self._proxy and "Host key verification failed" in how:
                self.close()
                raise HostKeyError(
                    f"{self.name}: the hypervisor's ssh host key is unknown or changed ({self.proxy}): check the key "
                    "and add it to ~/.ssh/known_hosts (ssh-keyscan), or name a file holding it with known_hosts=FILE "
                    "in the libvirt URI") from exc
            self.close()
            raise SSHError(f"{self.name}: SSH to {host_id} failed: {exc}{how}") from exc
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(15)
        if self.mac is not None:
            try:
                check_nic(client, self.mac, self.name, host_id)
            except SSHError:
                client.close()
                self.close()
                raise
        self._client = client
        return client

    @property
    def connected(self) -> bool:
        transport = self._client.get_transport() if self._client else None
        return transport is not None and transport.is_active()

    @property
    def client(self) -> paramiko.SSHClient:
        if not self.connected:
            return self.connect()
        assert self._client is not None
        return self._client

    @property
    def sftp(self) -> paramiko.SFTPClient:
        if self._sftp is None or not self.connected:
            self._sftp = self.client.open_sftp()
        return self._sftp

    def close(self) -> None:
        for closable in (self._sftp, self._client):
            if closable is not None:
                try:
                    closable.close()
                except Exception:  # already broken; nothing to release
                    pass
        self._sftp = None
        self._client = None
        if self._proxy is not None:
            self._proxy.close()
            self._proxy = None

    def exec(self, command: str, tag: str, timeout: float | None) -> CommandResult:
        started = time.monotonic()
        transport = self.client.get_transport()
        if transport is None:
            raise SSHError(f"{self.name}: SSH transport is gone")
        try:
            chan = transport.open_session(timeout=10)
            chan.exec_command(ssh_command_line(command, tag, self.sudo))
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self.close()
            raise SSHError(f"{self.name}: SSH session failed before {command!r} started: {exc}") from exc
        deadline = Deadline(timeout) if timeout is not None else None
        out, err = bytearray(), bytearray()
        try:
            while True:
                wait = 1.0 if deadline is None else min(1.0, deadline.remaining())
                select.select([chan], [], [], wait)
                while chan.recv_ready():
                    keep_tail(out, chan.recv(65536))
                while chan.recv_stderr_ready():
                    keep_tail(err, chan.recv_stderr(65536))
                if chan.exit_status_ready() and chan.eof_received and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                if not transport.is_active():
                    raise SSHError(f"{self.name}: SSH connection dropped while {command!r} ran")
                if deadline is not None and deadline.expired():
                    chan.close()
                    self.kill(tag)
                    raise CommandTimeout(command, timeout or 0.0, _text(out), _text(err))
            code = chan.recv_exit_status()
        except (OSError, paramiko.SSHException, EOFError) as exc:
            self.close()
            raise SSHError(f"{self.name}: SSH connection dropped while {command!r} ran: {exc}") from exc
        finally:
            chan.close()
        return CommandResult(command, code, _text(out), _text(err), time.monotonic() - started)

    def kill(self, tag: str) -> bool:
        """Kill the processes carrying ``tag`` (best effort, about 10 s at most); whether the kill ran."""
        try:
            script = kill_script(tag)
            if self.sudo:
                script = f"sudo -n /bin/sh -c {shlex.quote(script)}"
            _, stdout, _ = self.client.exec_command(script, timeout=10)
            deadline = Deadline(10)  # recv_exit_status() has no timeout: a wedged guest must not hang here
            while not stdout.channel.exit_status_ready() and not deadline.expired():
                time.sleep(0.02)
            done = stdout.channel.exit_status_ready()
            stdout.channel.close()
            return done
        except (paramiko.SSHException, OSError, EOFError, SSHError):
            return False  # the caller's error is what the user needs; this was best effort

    def transfer(self, direction: str, source: str, target: str, timeout: float) -> None:
        """SFTP ``put`` or ``get`` of ``source`` to ``target``, or CommandTimeout after ``timeout`` seconds.

        paramiko's transfers have no deadline of their own; at the deadline the SFTP session is closed
        from a timer, which ends whatever paramiko waits on, and the next transfer opens a new one.
        """
        sftp = self.sftp
        copy = sftp.put if direction == "put" else sftp.get
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            with contextlib.suppress(Exception):
                sftp.close()

        timer = threading.Timer(timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            copy(source, target)
        except Exception:
            if not expired.is_set():
                raise
            raise CommandTimeout(f"sftp {direction} {source} {target}", timeout) from None
        finally:
            timer.cancel()
            if expired.is_set() and self._sftp is sftp:
                self._sftp = None


def _text(data: bytearray) -> str:
    return bytes(data).decode("utf-8", errors="replace")
