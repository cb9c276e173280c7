"""How SSH reaches a guest whose port is forwarded on a remote hypervisor's loopback."""

from __future__ import annotations

import shlex
import socket
from urllib.parse import parse_qs, urlsplit

from ...errors import GuestError

SSH_TRANSPORTS = {"ssh", "libssh", "libssh2"}


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
