"""The libvirt backend's defaults and which URIs name libvirt's QEMU driver (no libvirt-python needed)."""

from __future__ import annotations

DEFAULT_LIBVIRT_URI = "qemu:///system"
DEFAULT_LIBVIRT_POOL = "vmfixtures"  # on remote libvirt hosts, for the copied images and states
DEFAULT_LIBVIRT_NETWORK = "default"  # snapshot mode: the libvirt network guests are reached on
# libvirt drivers that are not QEMU: they have no QMP, no QEMU save format, no agent pass-through.
NON_QEMU_SCHEMES = ("esx", "vpx", "gsx", "hyperv", "vbox", "vmwarews", "vmwareplayer", "vmwarefusion", "test")


def is_qemu_uri(uri: str) -> bool:
    """Whether ``uri`` names libvirt's QEMU driver (``qemu:///system``, ``qemu+ssh://host/system``)."""
    return uri.partition(":")[0].partition("+")[0].lower() not in NON_QEMU_SCHEMES
