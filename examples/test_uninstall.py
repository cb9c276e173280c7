"""Destructive tests a user would write: each starts from the same clean guest.

Run: pytest examples/   (the first run builds the image and boots once; later runs restore a saved state)
"""

from __future__ import annotations

import pytest

# tiny has no package manager: in an OS matrix these two run everywhere else and show tiny as skipped.
with_packages = pytest.mark.vm(images=["debian-12", "debian-13", "debian-12-sysv", "debian-12-openrc", "debian-12-i386",
                                       "debian-12-arm64", "debian-13-arm64", "debian-13-riscv64"])


@with_packages
def test_purge_removes_the_package(vm):
    vm.run("apt-get purge -y procps", check=True, timeout=300)
    assert not vm.run("dpkg -s procps").ok
    assert not vm.run("command -v ps").ok


@with_packages
def test_the_package_is_back(vm):
    # The purge above was reverted: this guest never saw it.
    assert vm.run("dpkg -s procps").ok
    assert "PID" in vm.run("ps -e", check=True).stdout


def test_wreck_etc(vm):
    vm.run("rm -rf /etc", timeout=120)
    assert not vm.run("test -e /etc/passwd").ok


def test_etc_is_whole_again(vm):
    assert "root:" in vm.run("cat /etc/passwd", check=True).stdout
