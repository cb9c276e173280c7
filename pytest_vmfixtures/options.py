"""Options, ini keys and the ``vm`` marker, parsed into plain values.

Pure functions, so the rules for bad input are unit-tested without pytest
running a session. Every complaint is one line and says what to write instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .accel import ACCELS
from .arch import ARCHES, by_name
from .backends.base import CAPABILITIES, NETWORKS
from .backends.libvirt.uris import is_qemu_uri
from .changes import check_patterns
from .images.byo import check_spec

DEFAULT_IMAGE = "debian-12"
DEFAULT_MEMORY_MB = 512
DEFAULT_CPUS = 1
MARKER_KEYS = ("image", "images", "memory_mb", "cpus", "network", "sha256", "user", "firmware", "needs")
BACKENDS = ("qemu", "libvirt")
RAM_STATES = ("auto", "mapped", "stream")  # how the QEMU backend's states keep guest RAM (backends/qemu/memory.py)
# How the libvirt backend keeps a clean guest: QEMU's saved state restored into new domains (QEMU
# driver only), or a hypervisor snapshot of each guest's own domain (every driver).
LIBVIRT_MODES = ("saved-state", "snapshot")


class OptionError(ValueError):
    """Bad option or marker; the plugin turns it into pytest.UsageError."""


DEFAULT_QEMU_BINARY = "qemu-system-x86_64"


def parse_qemu_binaries(values: Iterable[str]) -> tuple[str, dict[str, str]]:
    """``--vm-qemu-binary``: a bare PATH runs x86 guests, ``ARCH=PATH`` another architecture's.

    Returns the x86 binary and a map from QEMU target (``aarch64``) to binary; an
    architecture not given runs ``qemu-system-TARGET`` from PATH.
    """
    x86 = DEFAULT_QEMU_BINARY
    others: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            x86 = value
            continue
        try:
            arch = by_name(name)
        except KeyError:
            raise OptionError(f"--vm-qemu-binary {value}: unknown architecture {name!r}; "
                              f"use one of {', '.join(ARCHES)} (or a bare path for x86)") from None
        if not path:
            raise OptionError(f"--vm-qemu-binary {value}: give the emulator's path after '='")
        if arch.x86:
            x86 = path
        else:
            others[arch.family] = path
    return x86, others


@dataclass(frozen=True)
class MarkerSpec:
    """What the ``vm`` markers on a test (closest first) ask for."""

    image: str | None = None
    images: tuple[str, ...] | None = None
    memory_mb: int = DEFAULT_MEMORY_MB
    cpus: int = DEFAULT_CPUS
    network: str = "restricted"
    explicit: frozenset[str] = field(default_factory=frozenset)
    # Only for your own image (a path or URL): its digest, login user and firmware.
    sha256: str | None = None
    user: str | None = None
    firmware: str | None = None
    # What the test needs of the hypervisor (backends.base.CAPABILITIES); skipped where it is missing.
    needs: frozenset[str] = field(default_factory=frozenset)


def _needs(where: str, value: Any) -> frozenset[str]:
    if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
        raise OptionError(f'{where}: needs must be a list of capabilities, like needs=["qmp"]; got {value!r}')
    unknown = sorted(str(v) for v in value if v not in CAPABILITIES)
    if unknown:
        raise OptionError(f"{where}: needs={unknown[0]!r} is not a capability; known: {', '.join(CAPABILITIES)}")
    return frozenset(value)


def _int_in(where: str, key: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(f"{where}: {key} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise OptionError(f"{where}: {key}={value} is out of range; use {low}..{high}")
    return value


def parse_marker(where: str, marks: Iterable[tuple[tuple[Any, ...], Mapping[str, Any]]]) -> MarkerSpec:
    """Merge ``vm`` markers, closest first: a test's own marker overrides its class's and module's."""
    merged: dict[str, Any] = {}
    for args, kwargs in marks:
        if len(args) > 1:
            raise OptionError(f"{where}: @pytest.mark.vm takes at most one positional argument (the image)")
        values = dict(kwargs)
        if args:
            if "image" in values:
                raise OptionError(f"{where}: @pytest.mark.vm got the image both positionally and as image=")
            values["image"] = args[0]
        unknown = sorted(set(values) - set(MARKER_KEYS))
        if unknown:
            raise OptionError(
                f"{where}: @pytest.mark.vm got unknown argument {unknown[0]!r}; allowed: {', '.join(MARKER_KEYS)}"
            )
        for key, value in values.items():
            merged.setdefault(key, value)
    image = merged.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise OptionError(f"{where}: image must be an image name such as {DEFAULT_IMAGE!r}, got {image!r}")
    images = merged.get("images")
    if images is not None:
        if not isinstance(images, (list, tuple)) or not all(isinstance(i, str) and i for i in images):
            raise OptionError(f"{where}: images must be a list of image names, got {images!r}")
        images = tuple(images)
        if image is not None:
            raise OptionError(f"{where}: give either image= (pin one) or images= (restrict the matrix), not both")
    byo = {key: merged.get(key) for key in ("sha256", "user", "firmware")}
    if image is None and any(v is not None for v in byo.values()):
        raise OptionError(f"{where}: sha256=, user= and firmware= need image= (the path or URL of your image)")
    problem = check_spec(image, byo["sha256"], byo["user"], byo["firmware"]) if image is not None else None
    if problem is not None:
        raise OptionError(f"{where}: {problem}")
    network = merged.get("network", "restricted")
    if network not in NETWORKS:
        raise OptionError(f"{where}: network={network!r} is not one of {', '.join(NETWORKS)}")
    return MarkerSpec(
        image=image,
        images=images,
        memory_mb=_int_in(where, "memory_mb", merged.get("memory_mb", DEFAULT_MEMORY_MB), 64, 1 << 20),
        cpus=_int_in(where, "cpus", merged.get("cpus", DEFAULT_CPUS), 1, 256),
        network=network,
        explicit=frozenset(merged),
        sha256=byo["sha256"].lower() if isinstance(byo["sha256"], str) else None,
        user=byo["user"],
        firmware=byo["firmware"],
        needs=_needs(where, merged.get("needs", ())),
    )


def parse_choice(option: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise OptionError(f"{option} {value!r} is not one of {', '.join(choices)}")
    return value


def parse_accel(value: str) -> str:
    return parse_choice("--vm-accel", value, ACCELS)


def parse_backend(value: str) -> str:
    return parse_choice("--vm-backend", value, BACKENDS)


def parse_ram_state(value: str) -> str:
    return parse_choice("--vm-ram-state", value, RAM_STATES)


def parse_libvirt_mode(value: str | None, uris: Iterable[str]) -> str:
    """``--vm-libvirt-mode``: unset means saved-state on QEMU-driver URIs, snapshot when any is another driver's."""
    others = [uri for uri in uris if not is_qemu_uri(uri)]
    if not value:
        return "snapshot" if others else "saved-state"
    mode = parse_choice("--vm-libvirt-mode", value, LIBVIRT_MODES)
    if mode == "saved-state" and others:
        raise OptionError(f"--vm-libvirt-mode saved-state needs libvirt's QEMU driver, but {others[0]} is not one; "
                          "use --vm-libvirt-mode snapshot (or leave it unset)")
    return mode


def parse_positive(option: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"{option} must be a number of seconds, got {value!r}") from None
    if not (math.isfinite(number) and number > 0):
        raise OptionError(f"{option} must be positive, got {value!r}")
    return number


def parse_standby(value: Any) -> int:
    """``--vm-standby``: ``auto`` (-1: slot.STANDBY_AUTO) or a count of spares per machine config."""
    return -1 if str(value).strip() == "auto" else parse_count("--vm-standby", value, "or auto")


def parse_count(option: str, value: Any, alternative: str = "") -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise OptionError(f"{option} must be a whole number{' ' + alternative if alternative else ''}, got {value!r}") from None
    if number < 0:
        raise OptionError(f"{option} must be 0 or more, got {value!r}")
    return number


def parse_changes_ignore(values: Iterable[str]) -> tuple[str, ...]:
    """The ``vm_changes_ignore`` ini key: absolute glob patterns, one a line."""
    try:
        return check_patterns([v.strip() for v in values if v.strip()], "vm_changes_ignore")
    except ValueError as exc:
        raise OptionError(str(exc)) from None


def image_matrix(cli: Iterable[str], ini: Iterable[str]) -> list[str]:
    """The images unpinned tests run on: the command line wins over ini; duplicates dropped."""
    chosen = [i for i in cli if i] or [i for i in ini if i] or [DEFAULT_IMAGE]
    seen: dict[str, None] = {}
    for name in chosen:
        for part in name.split(","):
            if part.strip():
                seen.setdefault(part.strip(), None)
    return list(seen)
