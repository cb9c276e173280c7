"""A command the guest agent started is never run a second time over SSH (security review M5).

The agent is frozen (SIGSTOP, by the command itself, after guest-exec has returned its pid) while a
command that appends a line to a file runs: ``vm.run`` must raise CommandLost, kill what is left through
SSH, and the file must hold the line once. The next test on the same guest (reverted) has a working agent.
tiny is the cheapest image with an agent.
"""

from __future__ import annotations

import pytest

from pytest_vmfixtures import CommandLost, GuestError

FREEZE = "echo once >> /root/m5; sleep 1; kill -STOP $(pidof qemu-ga); exec sleep 300"


@pytest.mark.vm(image="tiny")
def test_a_command_whose_agent_freezes_is_not_run_again(vm) -> None:
    assert vm._instance.agent is not None, "tiny answers through its guest agent"
    with pytest.raises(CommandLost) as info:
        vm.run(FREEZE, timeout=6)
    assert isinstance(info.value, GuestError)
    assert "not run again" in str(info.value) and "\n" not in str(info.value)
    assert info.value.killed == "SSH"  # the agent is frozen
    assert vm._instance.agent is None, "the frozen agent is not asked again in this test"
    assert vm.run("cat /root/m5", check=True, timeout=60).stdout == "once\n"
    # Killed through SSH: a zombie at most (its parent, the frozen agent, cannot reap it).
    alive = "for p in $(pidof sleep); do grep -q 'State:.*Z' /proc/$p/status || echo $p; done"
    assert vm.run(alive, check=True, timeout=60).stdout == "", "the first copy was killed through SSH"
    assert "T" in vm.run("grep State /proc/$(pidof qemu-ga)/status", check=True, timeout=60).stdout


@pytest.mark.vm(image="tiny")
def test_the_next_test_gets_a_clean_guest_whose_agent_answers(vm) -> None:
    assert vm._instance.agent is not None
    result = vm.run("test ! -e /root/m5 && grep State /proc/$(pidof qemu-ga)/status", check=True, timeout=60)
    assert "T (stopped)" not in result.stdout
    assert vm._instance.agent is not None, "the command above went through the agent"
