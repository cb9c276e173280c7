"""What vm.run reports for commands a real guest ends oddly: killed by a signal, or printing bytes that are not
UTF-8. Over both channels: the guest agent (vm.run's first choice) and SSH (when there is no agent)."""

from __future__ import annotations

import pytest

from pytest_vmfixtures.channels import ssh as ssh_module


@pytest.fixture(params=["agent", "ssh"])
def channel(request: pytest.FixtureRequest, vm):
    if request.param == "ssh":
        instance = vm._instance  # as a guest without the agent: vm.run falls back to SSH
        if instance.agent is None:
            pytest.fail("the guest should have an agent to take away")
        instance.agent.close()
        instance.agent = None
    return request.param


def test_a_command_killed_by_a_signal_reports_like_a_shell(vm, channel):
    result = vm.run("echo partial; kill -9 $$", timeout=60)
    assert result.returncode == 137  # 128 + SIGKILL, as a shell reports it
    assert not result.ok
    assert result.stdout == "partial\n"


def test_output_that_is_not_utf8_is_decoded_with_replacements(vm, channel):
    result = vm.run(r"printf 'ok \377\376 end'", timeout=60, check=True)
    assert result.stdout == "ok \ufffd\ufffd end"


@pytest.mark.parametrize("channel", ["ssh"], indirect=True)
def test_ssh_keeps_only_the_tail_of_output_past_its_cap(vm, channel, monkeypatch):
    """Review finding L8: a command printing without end cannot fill the host's memory over SSH (the cap,
    64 MiB, is lowered to 1 MiB here so that a few MiB prove it)."""
    monkeypatch.setattr(ssh_module, "MAX_OUTPUT_BYTES", 1 << 20)
    result = vm.run("head -c 4194304 /dev/zero | tr '\\0' x; echo; echo END >&2; echo END", timeout=300, check=True)
    assert len(result.stdout) == 1 << 20
    assert result.stdout.endswith("xxxx\nEND\n")
    assert result.stderr == "END\n"
