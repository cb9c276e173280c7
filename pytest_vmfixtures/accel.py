"""Decide between KVM and TCG.

``/dev/kvm`` existing is not enough: some hosts load a KVM module that only
runs specially built guest kernels (PVM, ``kvm_pvm``), where a stock kernel
hangs right after decompression. ``auto`` takes KVM only when a module that
runs stock guests (``kvm_intel`` or ``kvm_amd``) is loaded and the device
opens read-write for this user; otherwise TCG, with the reason.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

ACCELS = ("auto", "kvm", "tcg")
STOCK_KVM_MODULES = ("kvm_intel", "kvm_amd")
SPECIAL_KVM_MODULES = ("kvm_pvm",)


@dataclass(frozen=True)
class HostFacts:
    """What the decision depends on, gathered once so the decision is pure."""

    kvm_device: bool
    kvm_accessible: bool
    modules: frozenset[str]


@dataclass(frozen=True)
class AccelChoice:
    accel: str  # "kvm" or "tcg"
    reason: str


def probe_host(sys_module: Path = Path("/sys/module"), device: Path = Path("/dev/kvm")) -> HostFacts:
    modules: set[str] = set()
    for name in (*STOCK_KVM_MODULES, *SPECIAL_KVM_MODULES, "kvm"):
        if (sys_module / name).exists():
            modules.add(name)
    exists = device.exists()
    return HostFacts(
        kvm_device=exists,
        kvm_accessible=exists and os.access(device, os.R_OK | os.W_OK),
        modules=frozenset(modules),
    )


def kvm_problem(facts: HostFacts) -> str | None:
    """Why KVM cannot run a stock guest here, or None when it can."""
    if not facts.kvm_device:
        return "no /dev/kvm (KVM module not loaded, or virtualization off in firmware or the parent hypervisor)"
    if not any(m in facts.modules for m in STOCK_KVM_MODULES):
        special = sorted(m for m in SPECIAL_KVM_MODULES if m in facts.modules)
        if special:
            return f"/dev/kvm is provided by {', '.join(special)}, which runs only specially built guest kernels"
        return "/dev/kvm exists but neither kvm_intel nor kvm_amd is loaded"
    if not facts.kvm_accessible:
        return "/dev/kvm is not readable and writable by this user (join the 'kvm' group)"
    return None


def choose_accel(requested: str, facts: HostFacts) -> AccelChoice:
    """Map ``auto|kvm|tcg`` to what QEMU will use.

    An explicit ``kvm`` is honoured even where auto would refuse it: the user
    may know better (a PVM guest kernel, say); QEMU then reports its own error.
    """
    if requested not in ACCELS:
        raise ValueError(f"unknown accel {requested!r}; use one of {', '.join(ACCELS)}")
    if requested == "tcg":
        return AccelChoice("tcg", "requested")
    if requested == "kvm":
        return AccelChoice("kvm", "requested")
    problem = kvm_problem(facts)
    if problem is None:
        return AccelChoice("kvm", "KVM usable")
    return AccelChoice("tcg", problem)


def accel_of_guest(session_accel: str, arch_name: str) -> str:
    """The session's accelerator, except that a guest of another architecture than the host's is emulated."""
    from .arch import by_name, is_native

    try:
        native = is_native(by_name(arch_name))
    except KeyError:
        native = True  # the backend refuses an unknown architecture with its own message
    return guest_accel(AccelChoice(session_accel, ""), native, arch_name).accel


def guest_accel(choice: AccelChoice, native: bool, guest: str) -> AccelChoice:
    """What one guest runs with: KVM runs only guests of the host's own architecture.

    ``native`` says whether the guest's architecture is the host's; ``guest`` names it for the reason.
    """
    if choice.accel == "kvm" and not native:
        return AccelChoice("tcg", f"{guest} guest on a {platform.machine()} host: emulated")
    return choice
