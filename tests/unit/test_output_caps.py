"""What a guest sends cannot fill the pytest process's memory (review finding L8).

The agent peer is a FAKE (a unix socket server, not qemu-guest-agent): a real agent never sends a reply
without end, which is exactly the broken case the cap is for.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_vmfixtures.channels import agent as agent_module
from pytest_vmfixtures.channels.agent import Agent, AgentError


@pytest.fixture
def endless_agent(tmp_path: Path) -> Iterator[Path]:
    """An 'agent' that answers the sync with its marker, then sends bytes without ever a newline."""
    path = tmp_path / "qga"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    stop = threading.Event()

    def serve() -> None:
        with contextlib.suppress(OSError):  # the client hung up
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"\xff")
                while not stop.is_set():
                    conn.sendall(b"x" * 65536)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        stop.set()
        listener.close()
        thread.join(10)


def test_an_agent_reply_without_end_is_cut_off(endless_agent: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_module, "MAX_REPLY_BYTES", 1 << 20)
    client = Agent(endless_agent, "tiny-1")
    try:
        with pytest.raises(AgentError, match="without a newline"):
            client.connect(60)
    finally:
        client.close()
