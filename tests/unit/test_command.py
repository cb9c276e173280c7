"""command: results, the line sent over SSH, and the tag-based kill, run on this host's /bin/sh."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from pytest_vmfixtures.command import (
    GUEST_PATH,
    TAG,
    CommandResult,
    agent_environment,
    agent_script,
    kill_script,
    new_tag,
    ssh_command_line,
)
from pytest_vmfixtures.errors import CommandError, VMError

SH = "/bin/sh"


# -- CommandResult ----------------------------------------------------------------


def test_ok_and_check_on_success() -> None:
    result = CommandResult("true", 0, "out", "")
    assert result.ok
    assert result.check() is result


def test_check_raises_command_error_with_everything() -> None:
    result = CommandResult("false", 3, "some output\n", "e1\ne2\ne3\ne4\ne5\ne6\ne7\n", 0.25)
    assert not result.ok
    with pytest.raises(CommandError) as info:
        result.check()
    error = info.value
    assert isinstance(error, VMError)
    assert (error.command, error.returncode, error.stdout, error.stderr) == (
        "false",
        3,
        "some output\n",
        "e1\ne2\ne3\ne4\ne5\ne6\ne7\n",
    )
    message = str(error)
    assert message.startswith("command 'false' exited with 3")
    assert "e3\ne4\ne5\ne6\ne7" in message  # the last five stderr lines
    assert "e2" not in message


def test_check_without_stderr_has_a_one_line_message() -> None:
    with pytest.raises(CommandError) as info:
        CommandResult("exit 1", 1, "", "  \n").check()
    assert str(info.value) == "command 'exit 1' exited with 1"


def test_negative_returncode_is_not_ok() -> None:
    assert not CommandResult("x", -9, "", "").ok


def test_new_tag_is_unique_hex() -> None:
    tags = {new_tag() for _ in range(100)}
    assert len(tags) == 100
    assert all(len(t) == 32 and int(t, 16) >= 0 for t in tags)


# -- ssh_command_line: what the guest's login shell receives ------------------------

ROUND_TRIP = [
    "echo hello",
    "printf '%s\\n' \"it's quoted\"",
    'echo "double \\"inner\\" quotes" \'single "mixed"\'',
    'x=1; y="$x$x"; echo "$y" $((x + 41))',
    "echo first\necho second\n\necho 'multi\nline literal'",
    "echo $(echo nested $(echo deeper)) `echo backticks`",
    "printf '%s|' a\\ b 'c  d' \"e\tf\"; echo",
    "echo '\\\\ backslashes \\n stay'",
    "printf '%s\\n' '$HOME is not expanded in single quotes' \"$HOME\"",
    "echo *.txt",
    "cat <<EOF\nheredoc $HOME\nEOF",
    "echo out; echo err >&2; exit 7",
    "for i in 1 2 3; do printf %s $i; done; echo",
    "false || echo 'or ran'; true && echo 'and ran'",
    "echo '#not a comment' # a comment",
    "echo ünïcødé ✓",
]


@pytest.mark.parametrize("command", ROUND_TRIP)
def test_ssh_command_line_round_trips_through_sh(command: str, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("")
    tag = new_tag()
    env = {"PATH": os.environ["PATH"], "HOME": "/home/someone"}
    direct = subprocess.run([SH, "-c", command], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=10)
    line = ssh_command_line(command, tag)
    via = subprocess.run([SH, "-c", line], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=10)
    assert (via.returncode, via.stdout, via.stderr) == (direct.returncode, direct.stdout, direct.stderr)


def test_ssh_command_line_exports_the_tag_to_the_command() -> None:
    tag = new_tag()
    line = ssh_command_line(f'printf %s "${TAG}"; sh -c \'printf " %s" "${TAG}"\'', tag)
    out = subprocess.run([SH, "-c", line], capture_output=True, text=True, timeout=10, env={"PATH": os.environ["PATH"]})
    assert out.stdout == f"{tag} {tag}"


def test_ssh_command_line_shape() -> None:
    line = ssh_command_line("echo 'hi'", "abc")
    assert line.startswith(f"{TAG}=abc /bin/sh -c ")
    assert line.endswith("; exit $?")


@pytest.mark.parametrize("login_shell", ["/bin/sh", "/bin/bash"])
def test_ssh_command_line_reports_a_signal_killed_command_as_a_shell_does(login_shell: str) -> None:
    line = ssh_command_line("echo partial; kill -9 $$", new_tag())
    out = subprocess.run([login_shell, "-c", line], capture_output=True, text=True, timeout=10)
    assert (out.returncode, out.stdout) == (137, "partial\n")


# -- agent_environment / agent_script ---------------------------------------------


def test_agent_environment_is_what_an_ssh_session_has() -> None:
    env = dict(item.split("=", 1) for item in agent_environment("t1", home="/home/u", user="u"))
    assert env == {
        "PATH": GUEST_PATH,
        "HOME": "/home/u",
        "USER": "u",
        "LOGNAME": "u",
        "SHELL": "/bin/sh",
        TAG: "t1",
    }


def test_agent_script_starts_in_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = dict(item.split("=", 1) for item in agent_environment("t2", home=str(home)))
    env["PATH"] = os.environ["PATH"]  # the host's, so the test runs anywhere
    script = agent_script("pwd; echo $" + TAG)
    out = subprocess.run([SH, "-c", script], capture_output=True, text=True, cwd="/", env=env)
    assert out.stdout.splitlines() == [str(home), "t2"]


def test_agent_script_without_home_stays_put(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "missing")}
    out = subprocess.run([SH, "-c", agent_script("pwd")], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert (out.returncode, out.stdout.strip(), out.stderr) == (0, str(tmp_path), "")


# -- kill_script, for real, on this host ----------------------------------------------


def _alive(pid: int) -> bool:
    """Running (a zombie left for a non-reaping init counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _tagged(tag: str) -> set[int]:
    pids = set()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"{TAG}={tag}".encode() in environ.read_bytes().split(b"\0"):
                pids.add(int(environ.parent.name))
        except OSError:
            continue
    return pids


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def test_kill_script_kills_a_tagged_process_tree_and_nothing_else() -> None:
    tag = new_tag()
    tree = subprocess.Popen([SH, "-c", "sleep 100 & sleep 100"], env={**os.environ, TAG: tag})
    bystander = subprocess.Popen(["sleep", "100"], env={**os.environ, TAG: new_tag()})
    untagged = subprocess.Popen(["sleep", "100"])
    try:
        deadline = time.monotonic() + 5
        sleeps: set[int] = set()
        while time.monotonic() < deadline:
            sleeps = {pid for pid in _tagged(tag) if _comm(pid) == "sleep"}
            if len(sleeps) == 2:
                break
            time.sleep(0.01)
        assert len(sleeps) == 2, "the tagged tree did not start two sleeps"
        victims = _tagged(tag)

        done = subprocess.run([SH, "-c", kill_script(tag)], capture_output=True, text=True, timeout=30)

        assert done.returncode == 0, done.stderr
        tree.wait(timeout=5)
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in victims) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not [pid for pid in victims if _alive(pid)]
        assert tree.returncode == -9
        assert untagged.poll() is None
        assert bystander.poll() is None
    finally:
        for proc in (tree, bystander, untagged):
            proc.kill()
            proc.wait()


def test_kill_script_with_nothing_to_kill_succeeds() -> None:
    done = subprocess.run([SH, "-c", kill_script(new_tag())], capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stderr) == (0, "")
