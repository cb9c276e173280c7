"""vmfx-runner's side of the wire, run here on the host: framing, replies, commands, and the agent client against it.

The runner is the guest program (channels/guest_runner.py); here it answers on a
unix socket instead of a virtio-serial port, and runs its commands on this host
(plain /bin/sh commands, nothing privileged). The guest side is tested on real
guests in tests/integration/test_runner_channel.py.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_vmfixtures.channels import guest_runner, runner
from pytest_vmfixtures.channels.agent import Agent, AgentRefused
from pytest_vmfixtures.command import new_tag
from pytest_vmfixtures.errors import CommandTimeout
from pytest_vmfixtures.images.byo import user_data
from pytest_vmfixtures.waiting import wait_for

SYNC = guest_runner.SYNC


def request(command: str, **arguments: object) -> bytes:
    return json.dumps({"execute": command, "arguments": arguments}).encode()


def reply(r: guest_runner.Runner, command: str, **arguments: object) -> dict[str, object]:
    raw = r.reply(request(command, **arguments))
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1  # one reply, one line
    parsed: dict[str, object] = json.loads(raw.removeprefix(SYNC))
    return parsed


def finished(r: guest_runner.Runner, pid: int) -> dict[str, object]:
    status: dict[str, object] = {}

    def exited() -> bool | None:
        status.update(reply(r, "guest-exec-status", pid=pid)["return"])  # type: ignore[arg-type]
        return True if status["exited"] else None

    wait_for("the command to end", exited, 20, interval=0.01)
    return status


# -- framing ----------------------------------------------------------------------
def test_frames_are_lines_and_the_rest_waits() -> None:
    assert guest_runner.frames(b'{"a":1}\n{"b":2}\n{"c"') == ([b'{"a":1}', b'{"b":2}'], b'{"c"')
    assert guest_runner.frames(b"\n  \n") == ([], b"")  # blank lines are no requests


def test_a_sync_byte_drops_what_came_before_it() -> None:
    """The host sends 0xff to discard a request half-read when a state was saved (as with the guest agent)."""
    assert guest_runner.frames(b'{"execute":"guest-ex' + SYNC + b'{"x":1}\n') == ([b'{"x":1}'], b"")
    assert guest_runner.frames(b"garbage" + SYNC + SYNC + b"{") == ([], b"{")


def test_an_endless_partial_request_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guest_runner, "MAX_REQUEST", 8)
    assert guest_runner.frames(b"x" * 9) == ([], b"")
    assert guest_runner.frames(b"x" * 8) == ([], b"x" * 8)


# -- replies ----------------------------------------------------------------------
def test_sync_delimited_reply_starts_with_the_marker_and_echoes_the_id() -> None:
    raw = guest_runner.Runner().reply(request("guest-sync-delimited", id=1234))
    assert raw.startswith(SYNC) and json.loads(raw[1:]) == {"return": 1234}
    assert reply(guest_runner.Runner(), "guest-ping") == {"return": {}}


def test_bad_requests_get_error_replies_not_silence() -> None:
    r = guest_runner.Runner()
    assert json.loads(r.reply(b"{not json"))["error"]["class"] == "GenericError"
    assert json.loads(r.reply(b"[1, 2]"))["error"]["class"] == "GenericError"
    assert reply(r, "guest-shutdown")["error"] == {"class": "CommandNotFound",
                                                   "desc": "The command guest-shutdown has not been found"}
    assert "Invalid parameter 'pid'" in str(reply(r, "guest-exec-status", pid=999999)["error"])
    assert reply(r, "guest-exec")["error"]["class"] == "GenericError"  # type: ignore[index]  # no path


def test_guest_info_names_the_runner() -> None:
    info = reply(guest_runner.Runner(), "guest-info")["return"]
    assert info["version"] == f"vmfx-runner {guest_runner.VERSION}"  # type: ignore[index]
    assert {c["name"] for c in info["supported_commands"]} == set(guest_runner.COMMANDS)  # type: ignore[index]


def test_exec_reports_exit_code_and_both_streams_as_bytes() -> None:
    r = guest_runner.Runner()
    pid = reply(r, "guest-exec", path="/bin/sh", arg=["-c", "printf 'o\\377'; printf e >&2; exit 7"],
                env=["PATH=/usr/bin:/bin"], **{"capture-output": True})["return"]["pid"]  # type: ignore[index]
    status = finished(r, pid)
    assert status["exitcode"] == 7
    assert base64.b64decode(str(status["out-data"])) == b"o\xff"
    assert base64.b64decode(str(status["err-data"])) == b"e"
    assert "Invalid parameter" in str(reply(r, "guest-exec-status", pid=pid)["error"])  # reported once


def test_exec_replaces_the_environment_and_starts_a_session_of_its_own() -> None:
    r = guest_runner.Runner()
    script = 'echo "$VMFX_X|${HOME:-unset}"; ps -o sid= -p $$; ps -o pid= -p $$'
    pid = reply(r, "guest-exec", path="/bin/sh", arg=["-c", script], env=["VMFX_X=1", "PATH=/usr/bin:/bin"],
                **{"capture-output": True})["return"]["pid"]  # type: ignore[index]
    lines = base64.b64decode(str(finished(r, pid)["out-data"])).decode().split()
    assert lines[0] == "1|unset"
    assert lines[1] == lines[2]  # session leader: a kill of its group reaches all it started


def test_a_command_killed_by_a_signal_reports_it() -> None:
    r = guest_runner.Runner()
    pid = reply(r, "guest-exec", path="/bin/sh", arg=["-c", "kill -TERM $$"], **{"capture-output": True})["return"]["pid"]  # type: ignore[index]
    status = finished(r, pid)
    assert status["signal"] == 15 and "exitcode" not in status


def test_output_past_the_cap_is_cut_and_marked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guest_runner, "MAX_OUTPUT", 1000)
    r = guest_runner.Runner()
    pid = reply(r, "guest-exec", path="/bin/sh", arg=["-c", "head -c 5000 /dev/zero"], **{"capture-output": True})["return"]["pid"]  # type: ignore[index]
    status = finished(r, pid)
    assert len(base64.b64decode(str(status["out-data"]))) == 1000 and status["out-truncated"] is True
    assert status["exitcode"] == 0  # the command was not stopped: its output was drained to the end


def test_input_data_reaches_the_command() -> None:
    r = guest_runner.Runner()
    pid = reply(r, "guest-exec", path="/bin/cat", **{"input-data": base64.b64encode(b"hi").decode(),
                                                     "capture-output": True})["return"]["pid"]  # type: ignore[index]
    assert base64.b64decode(str(finished(r, pid)["out-data"])) == b"hi"


def test_the_port_is_found_by_its_name_in_sysfs(tmp_path: Path) -> None:
    for device, name in (("vport0p1", "org.qemu.guest_agent.0"), ("vport0p2", guest_runner.PORT_NAME)):
        (tmp_path / device).mkdir()
        (tmp_path / device / "name").write_text(name + "\n")
    assert guest_runner.find_port(sysfs=tmp_path) == Path("/dev/vport0p2")
    assert guest_runner.find_port("other", sysfs=tmp_path) is None


# -- the host's agent client against the runner ---------------------------------------
class _HostGone(Exception):
    pass


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Path]:
    """A unix socket with the runner behind it (a stand-in for the port: a socket's end of file is final)."""
    path = tmp_path / "runner"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def gone(fd: int) -> None:
        raise _HostGone

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            try:
                guest_runner.serve(conn.fileno(), guest_runner.Runner(), idle=gone)
            except (_HostGone, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path
    server.close()
    thread.join(10)


def test_the_agent_client_runs_commands_through_the_runner(served: Path) -> None:
    client = Agent(served, "r-1", what=runner.WHAT)
    client.connect(10)
    result = client.exec("echo out; echo err >&2; umask; exit 3", new_tag(), timeout=20)
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n0022\n", "err\n")
    client.close()


def test_a_deadline_kills_the_command_and_what_it_started(served: Path) -> None:
    client = Agent(served, "r-1", what=runner.WHAT)
    client.connect(10)
    marker = new_tag()
    with pytest.raises(CommandTimeout):
        client.exec(f"echo started; sleep 300 & sleep 301; echo {marker}", new_tag(), timeout=1)
    # both sleeps carried the tag: the kill found them (no process of ours is left with that command line)
    left = client.exec("pgrep -f 'sleep 30[01]' || true", new_tag(), timeout=20)
    assert left.stdout == ""
    client.close()


def test_a_runner_that_answers_nothing_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    """A port with nobody reading (the runner killed): the ping finds it, nothing runs."""
    path = tmp_path / "silent"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    client = Agent(path, "r-1", what=runner.WHAT)
    try:
        with pytest.raises(Exception, match="vmfx-runner did not answer"):
            client.connect(0.5)
        with pytest.raises(AgentRefused, match="vmfx-runner does not answer; nothing was sent"):
            client.exec("true", new_tag(), timeout=5, channel_timeout=0.5)
    finally:
        client.close()
        server.close()


# -- the seed -------------------------------------------------------------------------
def test_the_seed_installs_the_runner_for_root_alone_and_starts_it() -> None:
    config = json.loads(user_data("vmfix", "ssh-ed25519 C", "PRIVATE", "ssh-ed25519 H").removeprefix("#cloud-config\n"))
    (written,) = config["write_files"]
    assert written == {"path": runner.GUEST_PATH, "content": runner.program(), "owner": "root:root",
                       "permissions": "0700"}
    assert "def serve(" in written["content"]  # the guest program itself
    assert config["runcmd"] == [["sh", "-c", runner.start_script()]]
    script = runner.start_script()
    assert "/usr/sbin/qemu-ga" in script and "exit 0" in script  # an image with the agent keeps the agent
    assert f"-I -S {runner.GUEST_PATH}" in script and "Restart=always" in script
