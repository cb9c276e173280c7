"""The two key pairs every image gets: the client key the plugin logs in with, and the guest's host key.

Both are made here in Python, so the client can pin the host key instead of
trusting whatever answers first.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

CLIENT_KEY_NAME = "id_ed25519"
HOST_KEY_NAME = "ssh_host_ed25519_key.pub"


def public_line(key: Ed25519PrivateKey) -> str:
    """The ``ssh-ed25519 AAAA...`` line of a key, as authorized_keys and known_hosts hold it."""
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode("ascii")
    )


def private_bytes(key: Ed25519PrivateKey) -> bytes:
    """The private key in OpenSSH's PEM form, as sshd and paramiko read it."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )


def write_keys(directory: Path) -> tuple[Ed25519PrivateKey, Ed25519PrivateKey]:
    """New client and host keys; write the client pair and the host's public line into ``directory``.

    The client's private key is created 0600 (ssh clients refuse looser modes); the host's private key
    is returned, not written: it goes into the guest only. Returns ``(client, host)``.
    """
    client = Ed25519PrivateKey.generate()
    host = Ed25519PrivateKey.generate()
    fd = os.open(directory / CLIENT_KEY_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_bytes(client))
    (directory / (CLIENT_KEY_NAME + ".pub")).write_text(public_line(client) + "\n", encoding="ascii")
    (directory / HOST_KEY_NAME).write_text(public_line(host) + "\n", encoding="ascii")
    return client, host
