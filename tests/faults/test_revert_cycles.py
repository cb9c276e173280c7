"""Ten destructive tests in a row: fill the disk, kill sshd, delete /etc; each starts clean."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("cycle", range(10))
def test_wreck_everything(vm, cycle: int) -> None:
    clean = vm.run("test -e /etc/passwd && test -x /usr/sbin/sshd && ! test -e /root/fill && pgrep -x sshd >/dev/null")
    assert clean.ok, f"cycle {cycle} did not start from a clean guest"
    vm.run("fallocate -l $(df --output=avail -B1 / | tail -1) /root/fill || true; "
           "pkill -KILL sshd; rm -f /usr/sbin/sshd; rm -rf /etc", timeout=120)
    assert int(vm.run("df --output=avail -B1 / | tail -1", check=True).stdout) < 64 * 1024 * 1024, "disk not full"
    assert not vm.run("test -e /etc/passwd").ok
