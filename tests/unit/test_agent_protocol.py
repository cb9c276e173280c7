"""channels.agent.Agent against a FAKE guest agent.

``FakeGuestAgent`` is not qemu-guest-agent: it is a unix socket server thread
that speaks the agent's newline-delimited JSON protocol and answers from a
script, so the protocol's edge cases (garbage before the sync marker, replies
split across reads, error replies) are reproducible
without a guest.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_vmfixtures.channels import agent as agent_module
from pytest_vmfixtures.channels.agent import Agent, AgentError, AgentRefused
from pytest_vmfixtures.command import TAG, kill_script
from pytest_vmfixtures.errors import CommandLost, CommandTimeout, GuestError

Reply = bytes | list[bytes] | None  # one chunk, chunks sent apart, or no answer at all
HANG_UP = b"<hang up>"  # in a reply: close the connection instead of sending anything more
Handler = Callable[[dict[str, Any]], Reply]


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def line(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode() + b"\n"


class FakeGuestAgent:
    """A fake qemu-guest-agent for protocol edge cases (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.requests: list[dict[str, Any]] = []
        self.handlers: dict[str, Handler] = {}
        self.sync_chunks: Callable[[int], list[bytes]] = lambda token: [b"\xff" + line({"return": token})]
        self.statuses: dict[int, list[dict[str, Any]]] = {}
        self.exec_script: Callable[[dict[str, Any]], list[dict[str, Any]]] = lambda request: [
            {"exited": True, "exitcode": 0}
        ]
        self.connections = 0
        self._pids = itertools.count(1000)
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(4)
        self._listener.settimeout(0.02)
        self._thread = threading.Thread(target=self._serve, name="fake-guest-agent", daemon=True)

    def __enter__(self) -> FakeGuestAgent:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()

    def commands(self) -> list[str]:
        return [r["execute"] for r in self.requests]

    # -- the server --------------------------------------------------------------
    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            with conn:
                self._converse(conn)

    def _converse(self, conn: socket.socket) -> None:
        conn.settimeout(0.02)
        buffer = b""
        while not self._stop.is_set():
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            if b"\xff" in buffer:  # like the real agent: 0xff drops any partial request
                buffer = buffer.rsplit(b"\xff", 1)[1]
            while b"\n" in buffer:
                raw, buffer = buffer.split(b"\n", 1)
                if not raw.strip():
                    continue
                request = json.loads(raw)
                self.requests.append(request)
                reply = self._answer(request)
                chunks = [reply] if isinstance(reply, bytes) else (reply or [])
                try:
                    for i, piece in enumerate(chunks):
                        if piece == HANG_UP:
                            return
                        if i:
                            time.sleep(0.01)  # arrive in separate reads
                        conn.sendall(piece)
                except OSError:
                    return

    def _answer(self, request: dict[str, Any]) -> Reply:
        command = request["execute"]
        args = request.get("arguments", {})
        if command in self.handlers:
            return self.handlers[command](request)
        if command == "guest-sync-delimited":
            return self.sync_chunks(args["id"])
        if command == "guest-exec":
            pid = next(self._pids)
            self.statuses[pid] = list(self.exec_script(request))
            return line({"return": {"pid": pid}})
        if command == "guest-exec-status":
            queue = self.statuses.get(args["pid"])
            if queue is None:
                return line({"error": {"class": "GenericError", "desc": f"Invalid parameter 'pid' {args['pid']}"}})
            status = queue.pop(0) if len(queue) > 1 else queue[0]
            return line({"return": status})
        if command in ("guest-set-time", "guest-ping"):
            return line({"return": {}})
        return line({"error": {"class": "CommandNotFound", "desc": f"The command {command} has not been found"}})


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="fqga-"))  # short: unix socket paths are limited to 108 bytes
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def fake(socket_dir: Path) -> Iterator[FakeGuestAgent]:
    with FakeGuestAgent(socket_dir / "qga") as server:
        yield server


@pytest.fixture
def agent(fake: FakeGuestAgent) -> Iterator[Agent]:
    client = Agent(fake.path, "debian-12-1")
    try:
        yield client
    finally:
        client.close()


# -- connecting and re-synchronising ---------------------------------------------------


def test_connect_syncs_with_a_fresh_token(fake: FakeGuestAgent, agent: Agent) -> None:
    agent.connect(5)
    assert agent.connected
    agent.connect(5)  # reconnecting replaces the connection
    sync = [r for r in fake.requests if r["execute"] == "guest-sync-delimited"]
    assert len(sync) == 2
    assert sync[0]["arguments"]["id"] != sync[1]["arguments"]["id"]
    assert all(isinstance(r["arguments"]["id"], int) for r in sync)


def test_sync_discards_garbage_before_the_marker(fake: FakeGuestAgent, agent: Agent) -> None:
    # After a restore the guest may still send a stale reply, or half of one, before the marker.
    fake.sync_chunks = lambda token: [
        line({"return": {"pid": 7, "stale": True}}),
        b'{"return": {"exited": tr',
        b"\x00\x01 not json at all\n",
        b"\xff" + line({"return": token}),
    ]
    agent.connect(5)
    assert agent.call("guest-ping") == {}


def test_sync_marker_and_reply_in_separate_reads(fake: FakeGuestAgent, agent: Agent) -> None:
    fake.sync_chunks = lambda token: [b"junk junk", b"\xff", b'{"retu', b'rn": ' + str(token).encode() + b"}", b"\n"]
    agent.connect(5)
    assert agent.call("guest-ping") == {}


def test_sync_marker_glued_to_garbage_in_one_read(fake: FakeGuestAgent, agent: Agent) -> None:
    fake.sync_chunks = lambda token: [b"garbage\n{half" + b"\xff" + line({"return": token})]
    agent.connect(5)
    assert agent.call("guest-ping") == {}


def test_sync_skips_replies_to_another_token(fake: FakeGuestAgent, agent: Agent) -> None:
    fake.sync_chunks = lambda token: [b"\xff" + line({"return": token + 1}) + b"\n" + line({"return": token})]
    agent.connect(5)
    assert agent.call("guest-ping") == {}


def test_connect_to_a_missing_socket(socket_dir: Path) -> None:
    agent = Agent(socket_dir / "absent", "debian-12-1")
    with pytest.raises(AgentError, match="debian-12-1: cannot open guest agent socket"):
        agent.connect(1)
    assert not agent.connected


def test_connect_to_a_silent_agent_is_an_agent_error(fake: FakeGuestAgent, agent: Agent) -> None:
    # Callers fall back to SSH on AgentError; the agent not answering the sync must raise that, not TimeoutError.
    fake.sync_chunks = lambda token: []
    with pytest.raises(AgentError, match="did not answer the sync within 0.3 s"):
        agent.connect(0.3)
    assert not agent.connected


def test_agent_that_hangs_up_during_sync(fake: FakeGuestAgent, agent: Agent) -> None:
    fake.sync_chunks = lambda token: [HANG_UP]
    with pytest.raises(AgentError, match="closed the connection"):
        agent.connect(2)
    assert not agent.connected


# -- calls ---------------------------------------------------------------------------


def test_call_before_connect(agent: Agent) -> None:
    with pytest.raises(AgentError, match="not connected"):
        agent.call("guest-ping")


def test_error_reply_is_an_agent_error_with_the_description(fake: FakeGuestAgent, agent: Agent) -> None:
    agent.connect(5)
    with pytest.raises(AgentError, match="debian-12-1: guest agent 'guest-frobnicate' failed: The command guest-frob"):
        agent.call("guest-frobnicate")
    assert agent.connected  # a refused command does not break the channel
    assert agent.call("guest-ping") == {}


def test_agent_error_is_a_guest_error() -> None:
    assert issubclass(AgentError, GuestError)


def test_garbage_reply_is_an_agent_error(fake: FakeGuestAgent, agent: Agent) -> None:
    fake.handlers["guest-ping"] = lambda request: b"this is not json\n"
    agent.connect(5)
    with pytest.raises(AgentError, match="sent garbage: b'this is not json'"):
        agent.call("guest-ping")


def test_reply_split_across_reads(fake: FakeGuestAgent, agent: Agent) -> None:
    fake.handlers["guest-info"] = lambda request: [b'{"return": {"ver', b'sion": "7.2.0"}', b"}\n"]
    agent.connect(5)
    assert agent.call("guest-info") == {"version": "7.2.0"}


def test_silent_call_times_out_and_drops_the_connection(fake: FakeGuestAgent, agent: Agent) -> None:
    fake.handlers["guest-ping"] = lambda request: None
    agent.connect(5)
    with pytest.raises(AgentError, match="did not answer 'guest-ping' within 0.2 s"):
        agent.call("guest-ping", timeout=0.2)
    assert not agent.connected  # a late reply must not be taken for the next call's


def test_connection_closed_mid_call(fake: FakeGuestAgent, agent: Agent) -> None:
    fake.handlers["guest-ping"] = lambda request: [HANG_UP]
    agent.connect(5)
    with pytest.raises(AgentError, match="closed the connection"):
        agent.call("guest-ping")
    assert not agent.connected


def test_exec_decodes_output_and_exit_code(fake: FakeGuestAgent, agent: Agent) -> None:
    fake.exec_script = lambda request: [
        {"exited": False},
        {"exited": False},
        {"exited": True, "exitcode": 3, "out-data": b64("hello\nworld\n"), "err-data": b64("oops\n")},
    ]
    agent.connect(5)
    result = agent.exec("echo hello; echo world; echo oops >&2; exit 3", "tag123", timeout=10)
    assert (result.returncode, result.stdout, result.stderr) == (3, "hello\nworld\n", "oops\n")
    assert result.command == "echo hello; echo world; echo oops >&2; exit 3"
    assert not result.ok
    assert result.duration >= 0
    statuses = [r for r in fake.requests if r["execute"] == "guest-exec-status"]
    assert len(statuses) == 3
    assert {r["arguments"]["pid"] for r in statuses} == {1000}


def test_exec_request_runs_sh_with_the_tag_and_captures_output(fake: FakeGuestAgent, agent: Agent) -> None:
    agent.connect(5)
    agent.exec("id -u", "tag456", timeout=None)
    (request,) = [r for r in fake.requests if r["execute"] == "guest-exec"]
    args = request["arguments"]
    assert args["path"] == "/bin/sh"
    assert args["arg"][0] == "-c"
    assert args["arg"][1].endswith("\nid -u")
    assert f"{TAG}=tag456" in args["env"]
    assert any(e.startswith("PATH=") for e in args["env"])
    assert args["capture-output"] is True


def test_exec_success_without_output(fake: FakeGuestAgent, agent: Agent) -> None:
    agent.connect(5)
    result = agent.exec("true", "t", timeout=5)
    assert (result.returncode, result.stdout, result.stderr, result.ok) == (0, "", "", True)


# A signal-killed command (137) and output that is not UTF-8 are shown on a real guest, over the agent and
# over SSH: tests/integration/test_command_results.py.


def test_exec_refused_by_the_agent(fake: FakeGuestAgent, agent: Agent) -> None:
    fake.handlers["guest-exec"] = lambda request: line(
        {"error": {"class": "GenericError", "desc": "Guest agent command failed, error was 'Failed to execute child'"}}
    )
    agent.connect(5)
    with pytest.raises(AgentError, match="'guest-exec' failed: Guest agent command failed"):
        agent.exec("true", "t", timeout=5)


def test_exec_status_error_after_the_start_is_a_lost_command(fake: FakeGuestAgent, agent: Agent) -> None:
    fake.handlers["guest-exec-status"] = lambda request: line(
        {"error": {"class": "GenericError", "desc": "Invalid parameter 'pid'"}}
    )
    agent.connect(5)
    with pytest.raises(CommandLost, match="'guest-exec-status' failed: Invalid parameter 'pid'"):
        agent.exec("true", "t", timeout=5)


# -- a command the agent started is never run twice (review M5) ------------------------


@pytest.fixture
def quick_kill(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_module, "KILL_SECONDS", 0.5)


def test_a_refused_start_is_an_agent_error_the_caller_may_retry_elsewhere(fake: FakeGuestAgent, agent: Agent) -> None:
    fake.handlers["guest-exec"] = lambda request: line({"error": {"class": "GenericError", "desc": "no"}})
    agent.connect(5)
    others: list[str] = []
    with pytest.raises(AgentRefused):
        agent.exec("true", "t", timeout=5, kill_elsewhere=lambda tag: others.append(tag) or True)
    assert others == [], "nothing ran, so nothing is killed"


def test_an_agent_that_does_not_answer_the_ping_is_sent_nothing(fake: FakeGuestAgent, agent: Agent) -> None:
    agent.connect(5)
    fake.handlers["guest-ping"] = lambda request: None  # stopped or frozen before the command
    with pytest.raises(AgentRefused, match="does not answer; nothing was sent"):
        agent.exec("echo x >> /f", "t", timeout=5, channel_timeout=0.3)
    assert "guest-exec" not in fake.commands(), "SSH may run it: the agent never saw it"


def test_a_start_with_no_answer_is_a_lost_command_not_a_refusal(fake: FakeGuestAgent, agent: Agent,
                                                                quick_kill: None) -> None:
    fake.handlers["guest-exec"] = lambda request: None  # received (maybe run), never answered
    agent.connect(5)
    others: list[str] = []
    with pytest.raises(CommandLost) as info:
        agent.exec("echo x >> /f", "tag9", timeout=5, channel_timeout=0.3,
                   kill_elsewhere=lambda tag: others.append(tag) or True)
    assert not isinstance(info.value, AgentError), "an AgentError would let the caller run it again over SSH"
    assert isinstance(info.value, GuestError)
    assert others == ["tag9"]
    assert info.value.killed == "another channel"  # the default name; VM.run names SSH
    message = str(info.value)
    assert "\n" not in message and "not run again" in message and "killed through another channel" in message


def test_an_agent_that_stops_answering_mid_command_is_a_lost_command(fake: FakeGuestAgent, agent: Agent,
                                                                     quick_kill: None) -> None:
    fake.exec_script = lambda request: [{"exited": False}]
    agent.connect(5)
    fake.handlers["guest-exec-status"] = lambda request: (
        line({"return": {"exited": False}}) if len(fake.commands()) < 6 else None)  # then frozen
    fake.handlers["guest-sync-delimited"] = lambda request: None  # and it cannot be re-synchronised
    with pytest.raises(CommandLost) as info:
        agent.exec("sleep 100", "tag10", timeout=None, channel_timeout=0.3, kill_elsewhere=lambda tag: False)
    assert info.value.killed == "" and "may still be running" in str(info.value)
    assert fake.commands().count("guest-exec") == 1


def test_a_timeout_whose_agent_kill_fails_kills_through_the_other_channel(fake: FakeGuestAgent, agent: Agent,
                                                                          quick_kill: None) -> None:
    fake.exec_script = lambda request: [{"exited": False}]
    agent.connect(5)
    fake.handlers["guest-exec"] = lambda request: (
        None if request["arguments"]["arg"][1] == kill_script("tag11") else line({"return": {"pid": 7}}))
    fake.handlers["guest-exec-status"] = lambda request: line({"return": {"exited": False}})
    others: list[str] = []
    with pytest.raises(CommandTimeout):
        agent.exec("sleep 100", "tag11", timeout=0.3, kill_elsewhere=lambda tag: others.append(tag) or True)
    assert others == ["tag11"]


def test_exec_timeout_kills_by_tag_and_returns_partial_output(fake: FakeGuestAgent, agent: Agent) -> None:
    killed = threading.Event()

    def script(request: dict[str, Any]) -> list[dict[str, Any]]:
        if request["arguments"]["arg"][1] == kill_script("slowtag"):
            killed.set()
            return [{"exited": True, "exitcode": 0}]
        return [{"exited": False}]

    def status(request: dict[str, Any]) -> bytes:
        pid = request["arguments"]["pid"]
        if pid == 1000 and killed.is_set():
            return line({"return": {"exited": True, "signal": 9, "out-data": b64("started\n")}})
        done = pid != 1000
        return line({"return": {"exited": done, "exitcode": 0} if done else {"exited": False}})

    fake.exec_script = script
    fake.handlers["guest-exec-status"] = status
    agent.connect(5)
    with pytest.raises(CommandTimeout) as info:
        agent.exec("echo started; sleep 1000", "slowtag", timeout=0.2)
    assert killed.is_set()
    assert info.value.timeout == 0.2
    assert info.value.stdout == "started\n"
    assert "did not finish within 0.2 s" in str(info.value)
    assert agent.connected  # the channel stays usable
    assert agent.exec("true", "t2", timeout=5).ok
