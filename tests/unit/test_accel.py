"""accel: the KVM/TCG decision is a pure function of HostFacts; probe_host reads a /sys/module tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_vmfixtures.accel import AccelChoice, HostFacts, choose_accel, kvm_problem, probe_host


def facts(*modules: str, device: bool = True, accessible: bool = True) -> HostFacts:
    return HostFacts(kvm_device=device, kvm_accessible=device and accessible, modules=frozenset(modules))


PVM = facts("kvm", "kvm_pvm")
REAL_INTEL = facts("kvm", "kvm_intel")
REAL_AMD = facts("kvm", "kvm_amd")


def test_pvm_host_falls_back_to_tcg_and_names_kvm_pvm() -> None:
    # /dev/kvm exists and opens, but only PVM provides it: a stock kernel would hang.
    choice = choose_accel("auto", PVM)
    assert choice.accel == "tcg"
    assert "kvm_pvm" in choice.reason
    assert kvm_problem(PVM) == choice.reason


@pytest.mark.parametrize("host", [REAL_INTEL, REAL_AMD], ids=["kvm_intel", "kvm_amd"])
def test_real_kvm_is_used(host: HostFacts) -> None:
    assert kvm_problem(host) is None
    assert choose_accel("auto", host) == AccelChoice("kvm", "KVM usable")


def test_real_kvm_module_wins_over_pvm_module() -> None:
    assert choose_accel("auto", facts("kvm", "kvm_intel", "kvm_pvm")).accel == "kvm"


def test_no_device_means_tcg() -> None:
    choice = choose_accel("auto", facts("kvm_intel", device=False))
    assert choice.accel == "tcg"
    assert "no /dev/kvm" in choice.reason


def test_device_without_any_vendor_module_means_tcg() -> None:
    choice = choose_accel("auto", facts("kvm"))
    assert choice.accel == "tcg"
    assert "kvm_intel" in choice.reason and "kvm_amd" in choice.reason


def test_inaccessible_device_means_tcg_and_mentions_kvm_group() -> None:
    choice = choose_accel("auto", facts("kvm", "kvm_intel", accessible=False))
    assert choice.accel == "tcg"
    assert "'kvm' group" in choice.reason


@pytest.mark.parametrize("host", [PVM, REAL_INTEL, facts(device=False)], ids=["pvm", "kvm", "none"])
@pytest.mark.parametrize("requested", ["tcg", "kvm"])
def test_explicit_choice_is_honoured_whatever_the_host(requested: str, host: HostFacts) -> None:
    assert choose_accel(requested, host) == AccelChoice(requested, "requested")


@pytest.mark.parametrize("bad", ["", "KVM", "hvf", "auto "])
def test_unknown_accel_is_a_value_error_listing_the_choices(bad: str) -> None:
    with pytest.raises(ValueError, match="auto, kvm, tcg"):
        choose_accel(bad, REAL_INTEL)


def _module_tree(root: Path, *names: str) -> Path:
    sys_module = root / "sys" / "module"
    sys_module.mkdir(parents=True)
    for name in (*names, "virtio_blk", "loop"):
        (sys_module / name).mkdir()
    return sys_module


def test_probe_host_on_a_pvm_tree(tmp_path: Path) -> None:
    sys_module = _module_tree(tmp_path, "kvm", "kvm_pvm")
    device = tmp_path / "kvm"
    device.write_bytes(b"")
    device.chmod(0o600)
    found = probe_host(sys_module, device)
    assert found == HostFacts(kvm_device=True, kvm_accessible=True, modules=frozenset({"kvm", "kvm_pvm"}))
    assert choose_accel("auto", found).accel == "tcg"


def test_probe_host_on_a_real_kvm_tree(tmp_path: Path) -> None:
    sys_module = _module_tree(tmp_path, "kvm", "kvm_amd")
    device = tmp_path / "kvm"
    device.write_bytes(b"")
    found = probe_host(sys_module, device)
    assert found.modules == frozenset({"kvm", "kvm_amd"})  # unrelated modules are not recorded
    assert found.kvm_device and found.kvm_accessible
    assert choose_accel("auto", found).accel == "kvm"


def test_probe_host_without_device(tmp_path: Path) -> None:
    found = probe_host(_module_tree(tmp_path, "kvm_intel"), tmp_path / "no-such-device")
    assert found == HostFacts(kvm_device=False, kvm_accessible=False, modules=frozenset({"kvm_intel"}))
    assert choose_accel("auto", found).accel == "tcg"


def test_probe_host_with_missing_sys_module(tmp_path: Path) -> None:
    assert probe_host(tmp_path / "absent", tmp_path / "absent-kvm").modules == frozenset()
