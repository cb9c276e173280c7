"""A hung command ends at the session's default deadline, and the guest is clean again for the next test.

The inner run uses the outer run's cache and the default machine config, so it restores the debian-12
ready state already there: no image build, no cold boot.
"""

from __future__ import annotations

import pytest

from pytest_vmfixtures.fixtures import SESSION_KEY

DEADLINE = 5  # short, but not so short that an ordinary command under TCG hits it

INNER = '''
import time

import pytest
from pytest_vmfixtures import CommandTimeout

NAMES = []


def test_hung_command_fails_at_the_default_deadline(vm):
    NAMES.append(vm.name)
    vm.run("echo dirty > /root/left-by-hung-test", check=True, timeout=60)
    vm.run("sleep 600")  # no timeout given: the default deadline ends it, and this test fails


def test_next_test_on_the_guest_passes(vm):
    assert vm.name == NAMES[0], "the same guest handle, reverted"
    assert not vm.run("test -e /root/left-by-hung-test", timeout=60).ok
    assert not vm.run("pgrep -x sleep", timeout=60).ok
    # An explicit timeout wins over the default (here a longer one).
    started = time.monotonic()
    assert vm.run("sleep {longer}; echo slept", timeout=120, check=True).stdout == "slept\\n"
    assert time.monotonic() - started >= {longer}


def test_hung_file_transfer_ends_at_the_default_deadline(vm, tmp_path):
    (tmp_path / "up").write_bytes(b"x" * 100000)
    vm.put(tmp_path / "up", "/root/first", timeout=60)  # the SFTP session, and its sftp-server, now exist
    vm.run("pkill -STOP -x sftp-server", check=True, timeout=60)
    started = time.monotonic()
    with pytest.raises(CommandTimeout) as info:
        vm.put(tmp_path / "up", "/root/second")
    assert info.value.timeout == {deadline}
    assert time.monotonic() - started >= {deadline}  # not before its deadline (how long after is no test's business)
    vm.run("pkill -KILL -x sftp-server; true", check=True, timeout=60)
    vm.put(tmp_path / "up", "/root/third", timeout=60)  # a new session
    vm.get("/root/third", tmp_path / "down", timeout=60)
    assert (tmp_path / "down").read_bytes() == b"x" * 100000


def test_hung_command_over_ssh_ends_at_the_default_deadline(vm):
    instance = vm._instance  # the guest agent answered the commands above; SSH is the other channel
    if instance.agent is not None:
        instance.agent.close()
        instance.agent = None
    started = time.monotonic()
    with pytest.raises(CommandTimeout) as info:
        vm.run("echo started; sleep 600")
    assert info.value.timeout == {deadline}
    assert info.value.stdout == "started\\n"
    assert time.monotonic() - started >= {deadline}
    assert not vm.run("pgrep -x sleep", timeout=60).ok  # killed in the guest, children too
'''


@pytest.mark.parametrize("how", ["ini", "option"])
def test_hung_command_ends_at_the_default_deadline(pytester: pytest.Pytester, request: pytest.FixtureRequest, how: str):
    cache = request.config.stash[SESSION_KEY].settings.cache_dir  # the outer run's, before pytester moves HOME
    pytester.makepyfile(test_inner=INNER.format(longer=DEADLINE + 3, deadline=DEADLINE))
    args = [f"--vm-cache={cache}", "-p", "no:cacheprovider", "-rA"]
    if how == "ini":
        pytester.makeini(f"[pytest]\nvm_command_timeout = {DEADLINE}\n")
    else:
        args.append(f"--vm-command-timeout={DEADLINE}")
    result = pytester.runpytest_subprocess(*args, timeout=540)
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines([
        f"*CommandTimeout: command 'sleep 600' did not finish within {DEADLINE} s",
        "FAILED test_inner.py::test_hung_command_fails_at_the_default_deadline*",
    ])
    assert "booting" not in result.stdout.str(), "the inner run should restore the cached state, not boot"
