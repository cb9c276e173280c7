"""What a run calls its libvirt domains and volumes, and whose a name is.

Our domains, and a remote host's per-guest volumes, are named
vmfx-<pid>-<8 hex>-<client>-<label>: the session (runtime.Runtime.session_id)
that owns it, in the pid namespace whose identity hashes to <client>: the
hostname (hosts are shared between machines), the pid namespace (a pid means
nothing outside its namespace: containers sharing a hostname see each other's
pids as dead) and the boot (pids start over). Only names of our own <client>
are ever reaped, and only when their session is gone (runtime.session_alive:
its lock, else its pid).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from pathlib import Path

DOMAIN_PREFIX = "vmfx-"
OWNED = re.compile(r"^vmfx-(\d+-[0-9a-f]{8})-([0-9a-f]{8})-")  # the session id, the client tag


def _client_tag() -> str:
    identity = [socket.gethostname()]
    for source in ("/proc/self/ns/pid", "/proc/sys/kernel/random/boot_id"):
        try:
            identity.append(os.readlink(source) if source.startswith("/proc/self/ns") else Path(source).read_text().strip())
        except OSError:
            identity.append("")
    return hashlib.sha256("\0".join(identity).encode()).hexdigest()[:8]


CLIENT = _client_tag()


def run_name(session_id: str, label: str) -> str:
    """The name of a domain (or a remote volume) of session ``session_id`` on this machine."""
    return f"{DOMAIN_PREFIX}{session_id}-{CLIENT}-{label}"


def owner(name: str, client: str = CLIENT) -> str | None:
    """The session that owns ``name``, if ``name`` is one of ``client``'s; else None."""
    match = OWNED.match(name)
    return match.group(1) if match and match.group(2) == client else None
