"""Before the first test: what this run's guest tests need of the host, checked once.

A missing thing that would fail every guest test of the run (no QEMU, the emulator of an image's
architecture, an unwritable cache, the build tools of an image not yet built, snapshot mode's libvirt
network down) is found here, right after collection, instead of once per test. ``--vm-unavailable``
says what then happens: ``error`` (the default) stops the run with one usage error naming the fix;
``skip`` skips the guest tests it dooms, with that reason, and runs the rest of the suite.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass

import pytest

from .arch import by_name
from .backends.libvirt.uris import is_qemu_uri
from .doctor import image_tool_needs, is_cached
from .errors import ImageError, VMError
from .images.byo import is_byo
from .images.cache import Cache
from .images.catalog import load_recipe
from .images.tools import have_tool
from .session import Settings, arch_problem, missing_tools

UNAVAILABLE = ("error", "skip")


@dataclass(frozen=True)
class Problem:
    """What stops guests from running here: for every image (``images`` None) or for some."""

    message: str
    images: frozenset[str] | None = None

    def dooms(self, image: str) -> bool:
        return self.images is None or image in self.images


def host_problems(settings: Settings, cache: Cache, wanted: Iterable[str], rootless: bool) -> list[Problem]:
    """Everything this run's images (``wanted``, recipe names and your own images) cannot do without."""
    problems = [Problem(message) for message in missing_tools(settings)]
    try:
        cache.ensure_writable()
    except ImageError as exc:
        problems.append(Problem(str(exc)))
    for name in sorted(n for n in wanted if not is_byo(n)):
        problems += _image_problems(settings, name, rootless)
    network = _network_problem(settings) if not problems else None
    return problems + ([Problem(network)] if network else [])


def _image_problems(settings: Settings, name: str, rootless: bool) -> list[Problem]:
    try:
        arch = by_name(load_recipe(name, settings.image_dirs).architecture)
    except (VMError, KeyError):
        return []  # a recipe that does not load or names an unknown architecture fails its build, with why
    problem = arch_problem(settings, name, arch)
    if problem:
        return [Problem(problem, frozenset({name}))]
    if is_cached(settings.cache_dir, name, settings.image_dirs):
        return []
    for tool, (package, _) in image_tool_needs(rootless, [name], settings.image_dirs).items():
        if not have_tool(tool):
            return [Problem(f"image {name!r} is not built yet and building it needs {tool}: "
                            f"install the {package} package (Debian: apt install {package})", frozenset({name}))]
    return []


def _network_problem(settings: Settings) -> str | None:
    """Snapshot mode reaches its guests on a libvirt network: one that is missing or down dooms them all."""
    if settings.backend != "libvirt" or settings.libvirt_mode != "snapshot" or importlib.util.find_spec("libvirt") is None:
        return None
    import libvirt  # type: ignore[import-untyped]

    from .backends.libvirt.network import network_problem
    from .backends.libvirt.uris import DEFAULT_LIBVIRT_URI

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors arrive as exceptions, not on stderr
    for uri in [u for u in settings.libvirt_uris or [DEFAULT_LIBVIRT_URI] if is_qemu_uri(u)]:
        try:
            conn = libvirt.open(uri)
        except libvirt.libvirtError:
            continue  # the backend names an unreachable host, and places guests on the others
        try:
            problem = network_problem(conn, uri, settings.libvirt_network)
        finally:
            conn.close()
        if problem:
            return str(problem)
    return None


def apply(problems: list[Problem], items: Iterable[tuple[pytest.Item, str]], mode: str) -> None:
    """``mode`` error: one usage error for the first problem; skip: each doomed guest test is skipped, saying why."""
    if not problems:
        return
    if mode == "error":
        raise pytest.UsageError(f"{problems[0].message} (or pass --vm-unavailable=skip to skip the tests that need a guest)")
    for item, image in items:
        doomed = next((p for p in problems if p.dooms(image)), None)
        if doomed is not None:
            item.add_marker(pytest.mark.skip(reason=f"no guest here (--vm-unavailable=skip): {doomed.message}"))
