"""The ssh line a person pastes (vm.ssh_command()) checks the guest's pinned host key."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat


def pasted(line: str, command: str) -> subprocess.CompletedProcess[str]:
    argv = shlex.split(line)
    argv[1:1] = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=30"]
    return subprocess.run([*argv, command], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_pasted_ssh_line_logs_in_with_host_key_checking_on(vm) -> None:
    line = vm.ssh_command()
    assert "StrictHostKeyChecking=yes" in line and "StrictHostKeyChecking=no" not in line
    assert "/dev/null" not in line
    result = pasted(line, "echo pasted-ok")
    assert result.returncode == 0 and result.stdout == "pasted-ok\n", result.stderr


def test_pasted_ssh_line_refuses_a_guest_with_another_key(vm) -> None:
    line = vm.ssh_command()
    [option] = [word for word in shlex.split(line) if word.startswith("UserKnownHostsFile=")]
    known_hosts = Path(option.split("=", 1)[1])
    alias, _key = known_hosts.read_text().split(" ", 1)
    # Pin some other ed25519 key: ssh must refuse the guest's real one.
    other = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    known_hosts.write_text(f"{alias} {other}\n")
    result = pasted(line, "echo should-not-run")
    assert result.returncode != 0 and "should-not-run" not in result.stdout
    assert "Host key verification failed" in result.stderr or "REMOTE HOST IDENTIFICATION HAS CHANGED" in result.stderr
