"""The libvirt tests' rig (libvirtd, a second libvirtd, the test sshd, the NAT network): what a test does
when a part of it is missing. In CI (CI=true) a rig that does not start is a failure with the reason, never
a skip: a broken rig must not pass for a green run. Elsewhere (a developer's machine) the test skips."""

from __future__ import annotations

import os
from types import ModuleType
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def missing(why: str) -> NoReturn:
    """Fail (in CI) or skip the current test because its rig is not there: ``why`` says what to do."""
    if in_ci():
        pytest.fail(f"test rig not available in CI: {why}", pytrace=False)
    pytest.skip(why)


def import_libvirt() -> ModuleType:
    """libvirt-python; in CI its absence fails the module, elsewhere it skips it."""
    try:
        import libvirt
    except ImportError:
        why = "libvirt-python is not installed: pip install -e '.[libvirt]'"
        if in_ci():
            raise pytest.UsageError(f"test rig not available in CI: {why}") from None
        pytest.skip(why, allow_module_level=True)
    return libvirt
