"""What did the uninstall leave behind? A package whose purge forgets a file, caught by vm.changes().

The package is built here on the host with dpkg-deb (no root needed) and copied into the guest, as a
real suite does with the .deb its build made. Run: pytest examples/test_residue.py
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

# Images with dpkg (tiny has no package manager).
with_dpkg = pytest.mark.vm(images=["debian-12", "debian-13", "debian-12-sysv", "debian-12-i386",
                                   "debian-12-arm64", "debian-13-arm64", "debian-13-riscv64"])

CONTROL = """Package: leaky
Version: 1.0
Architecture: all
Maintainer: Example <example@example.com>
Description: purges cleanly, except for the state its postinst made
"""
# postinst makes a state directory; the package's postrm never removes it on purge: the bug.
POSTINST = "#!/bin/sh\nset -e\nmkdir -p /var/lib/leaky\necho 1 > /var/lib/leaky/counter\n"


@pytest.fixture
def leaky_deb(tmp_path: Path) -> Path:
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed on this host (Debian: apt install dpkg)")
    root = tmp_path / "leaky"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(CONTROL)
    (root / "DEBIAN" / "postinst").write_text(POSTINST)
    (root / "DEBIAN" / "postinst").chmod(0o755)
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "leaky").write_text("#!/bin/sh\necho leaky\n")
    (root / "usr" / "bin" / "leaky").chmod(0o755)
    deb = tmp_path / "leaky_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(deb)], check=True,
                   capture_output=True)
    return deb


@with_dpkg
def test_purge_leaves_residue(vm, leaky_deb):
    vm.put(leaky_deb, "/root/leaky.deb")
    vm.run("dpkg -i /root/leaky.deb && rm /root/leaky.deb", check=True, timeout=300)
    installed = vm.changes()
    assert installed.packages.added == ["leaky"]
    assert "/usr/bin/leaky" in installed.added

    vm.run("dpkg --purge leaky", check=True, timeout=300)
    residue = vm.changes()
    # The package is gone, and so are its files, but not what its postinst made.
    assert not residue.packages
    assert residue.added == ["/var/lib/leaky", "/var/lib/leaky/counter"]
    assert str(residue) == "A /var/lib/leaky\nA /var/lib/leaky/counter"
    # A fixed package would pass `assert not vm.changes()`; this one would fail showing the two lines.
