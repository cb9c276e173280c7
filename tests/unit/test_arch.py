"""Guest architectures: names, the accelerator each guest gets, and --vm-qemu-binary's forms."""

from __future__ import annotations

import pytest

from pytest_vmfixtures import arch as arch_module
from pytest_vmfixtures.accel import AccelChoice, guest_accel
from pytest_vmfixtures.arch import ARCHES, by_name, image_arch, is_native
from pytest_vmfixtures.options import OptionError, parse_qemu_binaries

KVM = AccelChoice("kvm", "KVM usable")
TCG = AccelChoice("tcg", "requested")


@pytest.mark.parametrize(("name", "debian"), [
    ("arm64", "arm64"), ("aarch64", "arm64"), ("riscv64", "riscv64"), ("amd64", "amd64"), ("x86_64", "amd64"),
    ("i386", "i386"), ("i686", "i386"),
])
def test_every_spelling_finds_its_architecture(name: str, debian: str) -> None:
    assert by_name(name).debian == debian


def test_unknown_names_are_a_key_error() -> None:
    with pytest.raises(KeyError):
        by_name("sparc64")


def test_uname_names_are_what_the_guest_prints() -> None:
    assert {a.debian: a.uname for a in ARCHES.values()} == {
        "amd64": "x86_64", "i386": "i686", "arm64": "aarch64", "riscv64": "riscv64"}
    assert image_arch("i386") == "i386" and image_arch("arm64") == "aarch64"


@pytest.mark.parametrize(("host", "native"), [("x86_64", {"amd64", "i386"}), ("aarch64", {"arm64"}),
                                              ("riscv64", {"riscv64"})])
def test_native_means_the_hosts_own_family(monkeypatch: pytest.MonkeyPatch, host: str, native: set[str]) -> None:
    monkeypatch.setattr(arch_module.platform, "machine", lambda: host)
    assert {a.debian for a in ARCHES.values() if is_native(a)} == native


def test_kvm_runs_only_guests_of_the_hosts_architecture() -> None:
    assert guest_accel(KVM, native=True, guest="x86_64") == KVM
    emulated = guest_accel(KVM, native=False, guest="aarch64")
    assert emulated.accel == "tcg" and "aarch64 guest" in emulated.reason
    assert guest_accel(TCG, native=True, guest="x86_64") == TCG


def test_qemu_binary_bare_path_is_x86_and_arch_forms_are_per_target() -> None:
    assert parse_qemu_binaries([]) == ("qemu-system-x86_64", {})
    x86, others = parse_qemu_binaries(["/opt/q/x86", "arm64=/opt/q/a64", "riscv64=/opt/q/rv"])
    assert x86 == "/opt/q/x86"
    assert others == {"aarch64": "/opt/q/a64", "riscv64": "/opt/q/rv"}
    assert parse_qemu_binaries(["amd64=/opt/q/x"]) == ("/opt/q/x", {})


@pytest.mark.parametrize(("value", "message"), [
    ("sparc=/x", "unknown architecture 'sparc'"), ("arm64=", "give the emulator's path"),
])
def test_bad_qemu_binary_forms_say_what_to_write(value: str, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        parse_qemu_binaries([value])
