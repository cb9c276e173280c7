"""The driver-neutral life of a guest: define it from its family's template, start it, keep its
clean state as a hypervisor snapshot, revert to it, and remove everything.

Only libvirt's generic API is used here (no QMP, no save images, no QEMU
namespace), so the same calls work on every driver with the snapshot API; the
snapshot mode of the libvirt backend is built from them. Each call into
libvirt has a deadline; a refusal becomes a GuestError of one line that names
the domain, the step and libvirt's words.
"""

from __future__ import annotations

import logging
from typing import Any

from ...errors import GuestError
from .calls import bounded, libvirt
from .drivers import Driver, portable_domain_xml
from .xmltext import text

log = logging.getLogger("pytest_vmfixtures")

CALL_TIMEOUT = 120.0  # one libvirt call; a snapshot of a large guest on a slow datastore takes a while
CLEAN = "vmfx-clean"


def _call(domain_name: str, step: str, call: Any, timeout: float = CALL_TIMEOUT) -> Any:
    try:
        return bounded(f"{step} of {domain_name}", call, timeout)
    except libvirt.libvirtError as exc:
        raise GuestError(f"{domain_name}: {step} refused by libvirt: {exc.get_error_message()}") from exc


def define_from_template(conn: Any, driver: Driver, *, name: str, memory_mb: int, cpus: int, disk: str, mac: str,
                         network: str, firmware: str, **extra: object) -> Any:
    """Define (persistently: snapshots belong to a defined domain) the guest; returns the virDomain."""
    xml = portable_domain_xml(driver, name=name, memory_mb=memory_mb, cpus=cpus, disk=disk, mac=mac,
                              network=network, firmware=firmware, **extra)
    return _call(name, "defining the domain", lambda: conn.defineXML(xml))


def start(domain: Any) -> None:
    _call(domain.name(), "starting the domain", domain.create)


def take_clean_snapshot(domain: Any, name: str = CLEAN) -> Any:
    """A snapshot of the running guest, memory and disk: the state every test starts from."""
    xml = (f"<domainsnapshot><name>{text(name)}</name>"
           "<description>pytest-vmfixtures: the clean state tests are reverted to</description></domainsnapshot>")
    return _call(domain.name(), f"taking snapshot {name}", lambda: domain.snapshotCreateXML(xml, 0))


def revert(domain: Any, snapshot: Any) -> None:
    """Back to ``snapshot``, running as it was taken."""
    _call(domain.name(), f"reverting to snapshot {snapshot.getName()}", lambda: domain.revertToSnapshot(snapshot, 0))


def remove(domain: Any) -> list[str]:
    """Stop the guest, delete its snapshots and undefine it; safe to call twice.

    Each step runs even when one before it failed; what failed is logged and returned
    (empty when the domain is gone with nothing left).
    """
    name = domain.name()
    problems: list[str] = []

    def step(what: str, call: Any) -> None:
        try:
            _call(name, what, call)
        except GuestError as exc:
            log.warning("%s", exc)
            problems.append(str(exc))

    try:
        active = bool(bounded(f"the state of {name}", domain.isActive, CALL_TIMEOUT))
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return []
        active = True  # find out by trying
    if active:
        step("stopping the domain", domain.destroy)
    try:
        snapshots = bounded(f"the snapshots of {name}", lambda: domain.listAllSnapshots(0), CALL_TIMEOUT)
    except libvirt.libvirtError as exc:
        problems.append(f"{name}: listing its snapshots refused by libvirt: {exc.get_error_message()}")
        snapshots = []
    for snapshot in snapshots:
        step(f"deleting snapshot {snapshot.getName()}", lambda s=snapshot: s.delete(0))
    try:
        _call(name, "undefining the domain", domain.undefine)
    except GuestError as plain:
        # Plain undefine is what every driver takes (ESX refuses any flag); QEMU keeps a domain
        # that has an NVRAM or leftover metadata unless told to drop them too.
        try:
            _call(name, "undefining the domain with its NVRAM and metadata", lambda: domain.undefineFlags(UNDEFINE_ALL))
        except GuestError as flagged:
            log.warning("%s; %s", plain, flagged)
            problems.append(f"{plain}; {flagged}")
    return problems


UNDEFINE_ALL = 0
if libvirt is not None:
    UNDEFINE_ALL = (libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
