"""The host check tells the truth about what it finds (checked against fake hosts where it must)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pytest_vmfixtures import doctor
from pytest_vmfixtures.accel import HostFacts


def test_pvm_host_is_a_warning_naming_the_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "probe_host", lambda: HostFacts(True, True, frozenset({"kvm", "kvm_pvm"})))
    check = doctor.check_kvm()
    assert check.status == doctor.WARN
    assert "kvm_pvm" in check.message and "TCG" in check.message


def test_kvm_without_permission_names_the_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "probe_host", lambda: HostFacts(True, False, frozenset({"kvm", "kvm_intel"})))
    check = doctor.check_kvm()
    assert check.status == doctor.WARN and "usermod -aG" in check.message


def test_usable_kvm_is_ok(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "probe_host", lambda: HostFacts(True, True, frozenset({"kvm", "kvm_amd"})))
    assert doctor.check_kvm().status == doctor.OK


def test_missing_qemu_fails_with_the_package_to_install() -> None:
    check = doctor.check_qemu("/nonexistent/qemu-system-x86_64")
    assert check.status == doctor.FAIL and "apt install qemu-system-x86" in check.message


def test_unwritable_cache_fails(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    blocker.chmod(0o444)
    # A path under a regular file can never be a directory, root or not.
    check = doctor.check_cache(blocker / "cache")
    assert check.status == doctor.FAIL and "--vm-cache" in check.message


def test_stale_sessions_are_reported(tmp_path: Path) -> None:
    session = tmp_path / "run" / "999999-deadbeef"
    session.mkdir(parents=True)
    (session / "session.json").write_text('{"pid": 999999999, "start_time": "1"}')
    check = doctor.check_stale(tmp_path)
    assert check.status == doctor.WARN and "1 session" in check.message


def test_summary_counts_failures_first() -> None:
    checks = [doctor.Check(doctor.OK, "a", ""), doctor.Check(doctor.WARN, "b", ""), doctor.Check(doctor.FAIL, "c", "")]
    assert doctor.summary(checks).startswith("host check: 1 problem(s) (c)")
    assert doctor.summary(checks[:2]) == "host check: usable, 1 warning(s) (b)"


# -- libvirt's QEMU user and /dev/kvm (fake device nodes: a real one cannot be re-permissioned per test) --


def fake_node(mode: int, uid: int = 0, gid: int = 0) -> os.stat_result:
    return os.stat_result((stat.S_IFCHR | mode, 0, 0, 1, uid, gid, 0, 0, 0, 0))


QEMU_USER = ("libvirt-qemu", 64055, frozenset({107, 64055}))  # in group kvm (107), as Debian makes it


def test_root_only_kvm_node_costs_a_minute_per_libvirt_guest_and_names_the_fix() -> None:
    problem = doctor.libvirt_kvm_problem(fake_node(0o600), QEMU_USER)
    assert problem is not None
    assert problem.startswith("libvirt re-probes QEMU on every guest: about a minute each")
    assert "libvirt-qemu cannot open /dev/kvm" in problem and "crw-------" in problem
    assert "chgrp kvm /dev/kvm && chmod 0660 /dev/kvm" in problem


@pytest.mark.parametrize("node", [fake_node(0o660, gid=107), fake_node(0o666), fake_node(0o600, uid=64055)])
def test_kvm_node_libvirts_qemu_user_can_open_is_fine(node: os.stat_result) -> None:
    assert doctor.libvirt_kvm_problem(node, QEMU_USER) is None


@pytest.mark.parametrize("node", [
    fake_node(0o660, gid=4242),   # group is not one of the QEMU user's
    fake_node(0o606, gid=107),    # the group bits decide for a member, not the others' bits
    fake_node(0o640, gid=107),    # read but not write
])
def test_kvm_node_the_qemu_user_cannot_open_is_a_problem(node: os.stat_result) -> None:
    assert doctor.libvirt_kvm_problem(node, QEMU_USER) is not None


def test_no_node_no_qemu_user_or_root_qemu_user_is_no_problem() -> None:
    assert doctor.libvirt_kvm_problem(None, QEMU_USER) is None
    assert doctor.libvirt_kvm_problem(fake_node(0o600), None) is None
    assert doctor.libvirt_kvm_problem(fake_node(0o600), ("root", 0, frozenset({0}))) is None


def test_qemu_conf_user_and_group_are_read(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    conf.write_text('# user = "nobody"\nuser = "+0"\n')
    assert doctor.libvirt_qemu_identity(conf)[:2] == ("root", 0)  # type: ignore[index]
    conf.write_text('user = "no-such-user-here"\n')
    assert doctor.libvirt_qemu_identity(conf) is None


def test_check_warns_on_a_real_file_node_only_when_it_is_a_device(tmp_path: Path) -> None:
    plain = tmp_path / "kvm"
    plain.write_text("")
    assert doctor.check_libvirt_kvm(plain) is None  # not a character device: nothing to say
    assert doctor.check_libvirt_kvm(tmp_path / "missing") is None


def test_only_this_machines_system_libvirtd_gets_the_check() -> None:
    assert doctor.is_local_system("qemu:///system") and doctor.is_local_system("qemu+unix:///system?socket=/x")
    assert not doctor.is_local_system("qemu+ssh://farm/system") and not doctor.is_local_system("qemu:///session")


def test_a_missing_report_browser_is_information_not_a_problem(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    browser = ("chromium", "chromedriver")
    monkeypatch.setattr(doctor.shutil, "which", lambda tool, path=None: None if tool in browser else "/usr/bin/" + tool)
    check = doctor.check_report_browser()
    assert check.status == doctor.INFO and "apt install chromium chromium-driver" in check.message
    assert "report browser" not in doctor.summary([check])
    assert doctor.summary([check]) == "host check: all fine"
