"""The host check tells the truth about what it finds (checked against fake hosts where it must)."""

from __future__ import annotations

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
