"""libvirt-python (an optional extra), and blocking calls into it with a deadline.

Every module of this backend takes ``libvirt`` and ``libvirt_qemu`` from here:
None when the extra is not installed, which :func:`require_libvirt` turns
into the message saying what to install.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

from ...errors import GuestError

try:
    import libvirt  # type: ignore[import-untyped]
    import libvirt_qemu  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - depends on the optional extra
    libvirt = None
    libvirt_qemu = None

__all__ = ["bounded", "libvirt", "libvirt_qemu", "require_libvirt", "version_string"]

T = TypeVar("T")
_calls = ThreadPoolExecutor(max_workers=8, thread_name_prefix="vmfixtures-libvirt")


def require_libvirt() -> None:
    if libvirt is None:
        raise GuestError("the libvirt backend needs libvirt-python: pip install 'pytest-vmfixtures[libvirt]'")


def bounded(what: str, call: Callable[[], T], timeout: float, undo: Callable[[T], object] | None = None) -> T:
    """Run a blocking libvirt call with a deadline (libvirt-python releases the GIL while it waits).

    The call cannot be stopped at the deadline: ``undo`` is applied to what it returns if it completes
    after all (a domain created or defined late is destroyed, not left running with nobody to stop it).
    """
    future = _calls.submit(call)
    try:
        return future.result(timeout)
    except FutureTimeout:
        if undo is not None:
            future.add_done_callback(functools.partial(_undo_late, undo))
        raise GuestError(f"{what} did not answer within {timeout:g} s") from None


def _undo_late(undo: Callable[[T], object], future: Future[T]) -> None:
    if future.cancelled() or future.exception() is not None:
        return
    with contextlib.suppress(Exception):
        undo(future.result())


def version_string(number: int) -> str:
    return f"{number // 1000000}.{number // 1000 % 1000}.{number % 1000}"
