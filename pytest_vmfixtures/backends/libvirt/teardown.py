"""Removing a domain on every libvirt driver: the one teardown of both modes, the reaper and the sweep.

A transient domain (saved-state mode) is gone once stopped. A persistent one (snapshot mode) is
stopped, its snapshots are deleted one by one, and it is undefined: plainly first, the one form
every driver takes (ESX refuses any undefine flag), and where that is refused, with the flags
QEMU's driver wants for a domain with an NVRAM or leftover metadata. A domain already gone
(saved, crashed, removed by someone) is fine, and so is a second call. Each step runs even when
one before it failed; what failed is logged and returned. A step libvirt does not answer in time,
or a connection that is gone, ends the teardown there (a later run's reaper removes the domain).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from ...errors import GuestError
from .calls import bounded, libvirt

log = logging.getLogger("pytest_vmfixtures")

STEP_SECONDS = 120.0  # one libvirt call; deleting a snapshot of a large guest on a slow datastore takes a while

UNDEFINE_ALL = 0
if libvirt is not None:
    UNDEFINE_ALL = (libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)


class _Gone(Exception):
    """The domain is not there any more: nothing is left to do."""


class _Ended(Exception):
    """libvirt cannot be asked any more (no answer in time, or the connection is gone)."""


def drop_domain(domain: Any) -> list[str]:
    """Stop ``domain`` and, if it is persistent (snapshot mode), delete its snapshots and undefine it.

    Returns what failed, one line each (also logged); empty when the domain is gone with nothing left.
    """
    name = str(domain.name())
    problems: list[str] = []
    try:
        _teardown(domain, name, problems)
    except _Gone:
        pass
    except _Ended as exc:
        problems.append(f"{exc}; a later run's reaper removes domain {name}")
    for problem in problems:
        log.warning("%s", problem)
    return problems


def _teardown(domain: Any, name: str, problems: list[str]) -> None:
    step = functools.partial(_step, domain, name, problems)
    persistent = step("asking whether it is persistent", domain.isPersistent)
    active = True if persistent is False else step("asking whether it runs", domain.isActive)
    if active is not False:  # running, or not known: find out by trying
        step("stopping the domain", domain.destroy)
    if persistent is False:
        return  # a transient domain is gone once stopped
    for snapshot in step("listing its snapshots", lambda: domain.listAllSnapshots(0)) or []:
        step(f"deleting snapshot {snapshot.getName()}", functools.partial(snapshot.delete, 0))
    plain: list[str] = []
    _step(domain, name, plain, "undefining the domain", domain.undefine)
    if plain:
        flagged: list[str] = []
        _step(domain, name, flagged, "undefining the domain with its NVRAM and metadata",
              functools.partial(domain.undefineFlags, UNDEFINE_ALL))
        if flagged:
            problems.append(f"{plain[0]}; {flagged[0]}")


def _step(domain: Any, name: str, problems: list[str], what: str, call: Callable[[], Any]) -> Any:
    """``call``'s result, or None with libvirt's refusal noted in ``problems`` (a snapshot already gone is fine)."""
    try:
        return bounded(f"{name}: {what}", call, STEP_SECONDS)
    except GuestError as exc:  # past the deadline
        raise _Ended(str(exc)) from None
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            raise _Gone from None
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
            return None
        problem = f"{name}: {what} refused by libvirt: {exc.get_error_message()}"
    try:
        connected = bool(domain.connect().isAlive())
    except libvirt.libvirtError:
        connected = False
    if not connected:
        raise _Ended(problem)
    problems.append(problem)
    return None
