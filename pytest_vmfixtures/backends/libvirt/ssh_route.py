"""How SSH reaches a guest whose port is forwarded on a remote hypervisor's loopback.

The route is ``ssh -W`` through the hypervisor with StrictHostKeyChecking=yes: a machine that answers at
the hypervisor's address without its known key gets no session (and no image or state of ours).
"""

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
    # The same credentials libvirt's own ssh uses for this URI (its keyfile parameter), and the host's key
    # always checked: against the URI's known_hosts file, else the user's; its no_verify=1 is libvirt's only.
    query = parse_qs(parts.query)
    argv = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-W", f"127.0.0.1:{port}"]
    if parts.port:
        argv += ["-p", str(parts.port)]
    if parts.username:
        argv += ["-l", parts.username]
    if "keyfile" in query:
        argv += ["-i", query["keyfile"][0]]
    if "known_hosts" in query:
        argv += ["-o", f"UserKnownHostsFile={query['known_hosts'][0]}"]
    return shlex.join([*argv, host])
