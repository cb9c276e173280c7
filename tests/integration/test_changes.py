"""vm.changes(): what a test changed in its guest since the clean state, on every x86 catalog image
(systemd, sysvinit and OpenRC with dpkg; i386) and the busybox ``tiny`` image (no package manager,
busybox find/stat/awk only)."""

from __future__ import annotations

import os
import signal
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pytest_vmfixtures import GuestError
from pytest_vmfixtures.fixtures import SESSION_KEY
from pytest_vmfixtures.guest import GuestState

from .debs import build_deb

# GNU userland with dpkg, and busybox: the two ways the guest script runs.
IMAGES = ["debian-12", "tiny"]
# Every x86 catalog image, each init system (systemd, sysvinit, OpenRC, busybox) and i386: what each leaves
# behind on its own (volatile files of its services) must be in the defaults. The other architectures'
# images run the same guest script on the same Debian userland.
EVERY_IMAGE = ["debian-12", "debian-12-i386", "debian-12-openrc", "debian-12-sysv", "debian-13", "tiny"]

# The same on both images: every kind of change, and touches that are no change.
CHANGE = """set -e
echo new > /etc/vmfx-new
mkdir -p /etc/vmfx-dir/sub; echo f > /etc/vmfx-dir/sub/f
echo 'vmfx:x:4242:' >> /etc/group
chmod 600 /etc/shells
sed -i s/files/filez/ /etc/nsswitch.conf
ln -sfn ../run /var/run
rm /etc/profile
cp /etc/hosts /run/hosts; cat /run/hosts > /etc/hosts
touch /etc/hostname
echo gone > /etc/vmfx-gone; rm /etc/vmfx-gone
"""


def _ways(caplog: pytest.LogCaptureFixture) -> list[str]:
    """How each vm.changes() call found its answer, as its debug log line says."""
    return ["walked" if "listed every path" in r.getMessage() else "watched"
            for r in caplog.records if "vm.changes()" in r.getMessage()]


@pytest.mark.parametrize("image", IMAGES)
def test_added_modified_removed(vm_factory, image: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="pytest_vmfixtures")
    vm = vm_factory(image=image)
    assert not vm.changes(), "a guest just handed out has changed nothing"
    vm.run(CHANGE, check=True)
    changes = vm.changes()
    # debian-12 has perl: its baseline's watcher noted the paths; tiny (busybox) has none: every path is listed
    assert _ways(caplog) == ["watched" if image == "debian-12" else "walked"] * 2
    assert changes.added == ["/etc/vmfx-dir", "/etc/vmfx-dir/sub", "/etc/vmfx-dir/sub/f", "/etc/vmfx-new"]
    assert changes.modified == ["/etc/group", "/etc/nsswitch.conf", "/etc/shells", "/var/run"]
    assert changes.removed == ["/etc/profile"]
    assert not changes.packages
    assert changes
    lines = str(changes).splitlines()
    assert lines[:4] == ["C /etc/group", "C /etc/nsswitch.conf", "D /etc/profile", "C /etc/shells"]  # path order
    assert {"A /etc/vmfx-new", "A /etc/vmfx-dir/sub/f", "D /etc/profile", "C /var/run"} <= set(lines)
    # Asking again gives the same answer; ignore=: a path and everything under it, and globs.
    again = vm.changes(ignore=["/etc/vmfx-dir", "/etc/n*"])
    assert again.added == ["/etc/vmfx-new"] and again.removed == changes.removed
    assert again.modified == ["/etc/group", "/etc/shells", "/var/run"]
    if image == "debian-12":  # a test that stopped the watcher still gets the answer: every path is listed
        vm.run("kill -KILL $(cat /run/vmfx-changes/watch/ready)", check=True)
        caplog.clear()
        assert vm.changes() == changes
        assert _ways(caplog) == ["walked"]


def test_bad_patterns_name_themselves(vm) -> None:
    with pytest.raises(ValueError, match=r"'etc/\*' is not an absolute glob"):
        vm.changes(ignore=["/ok", "etc/*"])
    with pytest.raises(ValueError, match="42 is not a string"):
        vm.changes(ignore=[42])
    with pytest.raises(ValueError, match="None"):
        vm.changes(ignore=None)  # type: ignore[arg-type]
    assert vm.state == GuestState.READY, "a refused call did not touch the guest"


@pytest.mark.parametrize("image", EVERY_IMAGE)
def test_reading_changes_nothing(vm_factory, image: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="pytest_vmfixtures")
    vm = vm_factory(image=image)
    vm.run("cat /etc/passwd >/dev/null; ls -laR /etc /usr/lib >/dev/null; ps >/dev/null 2>&1; uname -a", check=True)
    vm.sftp.listdir("/etc")
    vm.get("/etc/hostname", tmp_path / "hostname")
    vm.ssh.exec_command("id")[1].read()  # a login over SSH of its own (lastlog, wtmp: logs)
    assert str(vm.changes()) == "no changes"
    assert not vm.changes()
    # every image with perl (all but the busybox one, i386 included) answers from its watcher's notes
    assert _ways(caplog) == ["walked" if image == "tiny" else "watched"] * 2


@pytest.mark.vm(image="debian-12")
def test_clean_state_is_kept_by_asking(vm) -> None:
    assert not vm.changes()
    assert vm.state == GuestState.READY, "asking changes nothing, so the guest needs no revert"


@pytest.mark.vm(image="debian-12")
def test_well_behaved_package_leaves_nothing(vm, tmp_path: Path) -> None:
    deb = build_deb(tmp_path, "vmfx-good", files={"/usr/share/vmfx-good/data": "data\n", "/etc/vmfx-good.conf": "x=1\n"})
    vm.put(deb, "/root/good.deb")
    vm.run("dpkg -i /root/good.deb && rm /root/good.deb", check=True, timeout=300)
    installed = vm.changes()
    assert installed.packages.added == ["vmfx-good"]
    assert installed.added == ["/etc/vmfx-good.conf", "/usr/share/vmfx-good", "/usr/share/vmfx-good/data"]
    vm.run("dpkg --purge vmfx-good", check=True, timeout=300)
    assert str(vm.changes()) == "no changes"


@pytest.mark.vm(image="debian-12")
def test_purge_residue_and_package_versions(vm, tmp_path: Path) -> None:
    bad = build_deb(tmp_path, "vmfx-bad", files={"/usr/share/vmfx-bad/data": "data\n"},
                    postinst="mkdir -p /var/lib/vmfx-bad; echo 1 > /var/lib/vmfx-bad/state")
    newer = build_deb(tmp_path, "procps", version="99:1.0")  # procps at another version (and no files)
    vm.put(bad, "/root/bad.deb")
    vm.put(newer, "/root/procps.deb")
    vm.run("dpkg -i /root/bad.deb /root/procps.deb && dpkg --purge vmfx-bad && rm /root/*.deb", check=True, timeout=300)
    changes = vm.changes()
    assert [p for p in changes.added if not p.startswith("/usr/")] == ["/var/lib/vmfx-bad", "/var/lib/vmfx-bad/state"]
    assert "/usr/bin/ps" in changes.removed, "procps 99 has no files: the real one's are gone"
    assert changes.packages.added == [] and changes.packages.removed == []
    assert changes.packages.modified == ["procps"]
    assert "package version changed: procps" in str(changes)
    # the same .deb's content with a byte changed in place (size and owner equal): a change
    vm.run("printf X | dd of=/usr/share/common-licenses/GPL-3 bs=1 seek=10 conv=notrunc 2>/dev/null", check=True)
    # rewritten with the same content (times moved, the content hash is dpkg's): no change
    vm.run("cp /usr/share/common-licenses/GPL-2 /run/g && cat /run/g > /usr/share/common-licenses/GPL-2", check=True)
    after = vm.changes(ignore=["/usr/bin", "/usr/share/doc", "/usr/share/man", "/usr/share/locale"])
    assert [p for p in after.modified if p.startswith("/usr/share/common-licenses")] == ["/usr/share/common-licenses/GPL-3"]


@pytest.mark.parametrize("image", IMAGES)
def test_broken_tools_answer_or_say_why(vm_factory, image: str) -> None:
    vm = vm_factory(image=image)
    vm.run("rm -rf /usr/bin /usr/sbin", timeout=120)
    try:
        changes = vm.changes()
    except GuestError as exc:
        message = str(exc)
        assert "\n" not in message and "cannot tell what changed" in message
        return
    assert "/usr/bin" in changes.removed


@pytest.mark.vm(image="tiny")
def test_dead_guest_raises_as_run_does(vm) -> None:
    vm.run("true", check=True)
    os.kill(vm.machine.process.pid, signal.SIGKILL)
    with pytest.raises(GuestError, match="died") as info:
        vm.changes()
    assert "SIGKILL" in str(info.value)
    with pytest.raises(GuestError):
        vm.run("true")


FAILING = '''
def test_leaves_residue(vm):
    vm.run("echo left > /etc/vmfx-left; echo skip > /etc/vmfx-ignored", check=True)
    assert False, "on purpose"
'''


def test_report_section_of_failed_test(pytester: pytest.Pytester, request: pytest.FixtureRequest) -> None:
    pytester.makepyfile(test_fail=FAILING)
    pytester.makeini("[pytest]\nvm_changes_ignore =\n    /etc/vmfx-ign*\n")
    junit = pytester.path / "junit.xml"
    cache = request.config.stash[SESSION_KEY].settings.cache_dir
    result = pytester.runpytest_subprocess(f"--vm-cache={cache}", "--vm-report-changes", f"--junitxml={junit}",
                                           "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*- vm changes -*", "A /etc/vmfx-left"])
    assert "A /etc/vmfx-ignored" not in result.stdout.lines, "vm_changes_ignore leaves it out"
    properties = {p.get("name"): p.get("value") for p in ET.parse(junit).iter("property")}
    assert properties["vm changes"] == "A /etc/vmfx-left"


def test_bad_ini_pattern_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x="def test_x(vm):\n    pass\n")
    pytester.makeini("[pytest]\nvm_changes_ignore = var/log\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*vm_changes_ignore: pattern 'var/log' is not an absolute glob*"])
