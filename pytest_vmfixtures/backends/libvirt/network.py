"""Snapshot mode's network: the libvirt network guests sit on, and finding a guest's address on it.

Snapshot-mode guests have no port forwarded on the host (that is a QEMU user-mode network
feature); they sit on a libvirt network (NAT, DHCP by libvirt's dnsmasq) and SSH goes to
their address there, which the hypervisor reports through ``interfaceAddresses``.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Any

from ...errors import GuestError
from .calls import bounded, libvirt
from .xmltext import attr

ADDRESS_CALL_SECONDS = 30.0

NETWORK_OPTION = "--vm-libvirt-network"


def network_problem(conn: Any, uri: str, network: str) -> str | None:
    """Why guests at ``uri`` cannot be reached on ``network`` (one line), or None."""
    try:
        net = conn.networkLookupByName(network)
    except libvirt.libvirtError:
        return (f"{NETWORK_OPTION} {network}: {uri} has no libvirt network {network!r}, so snapshot-mode guests "
                f"there could not be reached; define one (virsh net-define, then net-start) or name another")
    try:
        active = bool(bounded(f"{uri}: is network {network!r} active", net.isActive, 30.0))
    except libvirt.libvirtError as exc:
        return f"{NETWORK_OPTION} {network}: cannot ask {uri} about it: {exc.get_error_message()}"
    except GuestError as exc:
        return f"{NETWORK_OPTION} {network}: {exc}"
    if not active:
        return (f"{NETWORK_OPTION} {network}: the libvirt network {network!r} at {uri} is not active, so guests "
                f"could not be reached on it: virsh -c {uri} net-start {network}")
    return None


def interface_xml(network: str, mac: str) -> str:
    """The guest's one NIC, on ``network``: virtio where the driver has it (the QEMU driver's XML)."""
    return (f"<interface type='network'><source network='{attr(network)}'/><mac address='{attr(mac)}'/>"
            "<model type='virtio'/></interface>")


def address_sources() -> list[tuple[str, int]]:
    """Where a guest's address can come from, in the order asked: the DHCP lease, the host's ARP table, the agent."""
    return [
        ("lease", libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE),
        ("arp", libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP),
        ("agent", libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT),
    ]


def guest_address(domain: Any, mac: str, tried: dict[str, str] | None = None) -> str | None:
    """The guest's IPv4 address on its NIC ``mac``, from whichever source the driver offers; None if none knows it yet.

    ``tried`` collects what each source said, for the error when no address ever comes.
    """
    for source, flag in address_sources():
        try:  # bounded: a hung libvirtd (or agent) is an error here, not a wait without end inside wait_for
            interfaces = bounded(f"asking libvirt for the guest's address ({source})",
                                 functools.partial(domain.interfaceAddresses, flag, 0), ADDRESS_CALL_SECONDS) or {}
        except libvirt.libvirtError as exc:
            if tried is not None:
                tried[source] = str(exc.get_error_message())
            continue
        for interface in interfaces.values():
            if str(interface.get("hwaddr", "")).lower() != mac.lower():
                continue
            for addr in interface.get("addrs") or []:
                if addr.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV4 and not ipaddress.ip_address(addr["addr"]).is_loopback:
                    return str(addr["addr"])
        if tried is not None:
            tried[source] = "no address yet"
    return None
