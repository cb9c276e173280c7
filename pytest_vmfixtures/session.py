"""What one pytest process owns: settings, the runtime dir, the backend, the pool.

Built lazily on the first test that needs a guest, so a run without guest
tests starts no QEMU and creates nothing. Closed from ``pytest_sessionfinish``
and, as a last resort, from ``atexit``.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib.util
import inspect
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .accel import AccelChoice, choose_accel, probe_host
from .arch import Arch, missing_firmware
from .backends.base import Backend
from .backends.libvirt.uris import DEFAULT_LIBVIRT_NETWORK, DEFAULT_LIBVIRT_POOL, DEFAULT_LIBVIRT_URI
from .command import DEFAULT_COMMAND_TIMEOUT
from .images.cache import Cache
from .images.catalog import BUILTIN_IMAGES_DIR
from .pool import Pool
from .runtime import Runtime

log = logging.getLogger("pytest_vmfixtures")


@dataclass(frozen=True)
class Settings:
    images: list[str]
    image_dirs: list[Path]
    accel: str
    cache_dir: Path
    boot_timeout: float
    backend: str
    standby: int
    qemu_binary: str
    provision_key: str
    artifacts: Path | None = None
    keep_on_failure: bool = False
    libvirt_uris: list[str] = field(default_factory=list)
    libvirt_pool: str = DEFAULT_LIBVIRT_POOL
    libvirt_mode: str = "saved-state"  # or "snapshot" (options.LIBVIRT_MODES)
    libvirt_network: str = DEFAULT_LIBVIRT_NETWORK  # snapshot mode's libvirt network
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT  # vm.run, put and get given no timeout
    qemu_binaries: dict[str, str] = field(default_factory=dict)  # QEMU target -> emulator, besides x86's
    ram_state: str = "auto"  # the QEMU backend's states: mapped or stream RAM (options.RAM_STATES)
    unavailable: str = "error"  # a host that cannot run the run's guests: stop the run, or skip their tests
    changes_ignore: tuple[str, ...] = ()  # vm_changes_ignore: vm.changes() leaves these out, on top of its defaults
    report_changes: bool = False  # --vm-report-changes: a "vm changes" section in failed tests' reports


def provision_fingerprint(config: pytest.Config, extra: str) -> str:
    """The source of every pytest_vm_provision implementation, so editing one provisions again."""
    impls = config.pluginmanager.hook.pytest_vm_provision.get_hookimpls()
    if not impls and not extra:
        return ""  # nothing provisions: the same state as any other run without provisioning
    parts = [extra]
    for impl in impls:
        try:
            parts.append(inspect.getsource(impl.function))
        except (OSError, TypeError):
            parts.append(f"{impl.plugin_name}:{getattr(impl.function, '__qualname__', impl.function)}")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


class VMSession:
    def __init__(self, config: pytest.Config, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        self.accel: AccelChoice = choose_accel(settings.accel, probe_host())
        self.cache = Cache(settings.cache_dir)
        self._runtime: Runtime | None = None
        self._pool: Pool | None = None
        self._closed = False
        self.artifacts_written = False
        atexit.register(self.close)

    def artifacts_root(self) -> Path:
        """Where failed tests' evidence goes: --vm-artifacts, else beside the JUnit XML or HTML report, else basetemp."""
        if self.settings.artifacts is not None:
            return self.settings.artifacts.absolute()
        for option in ("xmlpath", "htmlpath"):  # --junitxml, pytest-html's --html: a report CI archives
            report = self.config.getoption(option, None)
            if report:
                return Path(str(report)).expanduser().absolute().parent / "vm-artifacts"
        factory: pytest.TempPathFactory = self.config._tmp_path_factory  # type: ignore[attr-defined]
        return factory.getbasetemp() / "vm-artifacts"

    def kept_guest_lines(self) -> list[str]:
        if self._pool is None:
            return []
        return [
            f"vmfixtures: kept failed guest {vm.name} ({nodeid}) running; get in with: {vm.ssh_command()}"
            for vm, nodeid in self._pool.kept
        ]

    def channel_line(self) -> str | None:
        """Which channel ``vm.run`` got on each image used (the first guest's; a failure later falls back to SSH)."""
        if self._pool is None or not self._pool.channels:
            return None
        return "vmfixtures: commands went through: " + ", ".join(
            f"{label} {channel}" for label, channel in sorted(self._pool.channels.items()))

    def progress(self, message: str) -> None:
        log.info(message)
        if self.config.get_verbosity() < 0:
            return
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None:
            return
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        suspended = capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext()
        with suspended:  # progress goes to the terminal, not into a test's captured output
            reporter.ensure_newline()
            reporter.write_line(f"[vmfixtures] {message}", cyan=True)

    @property
    def pool(self) -> Pool:
        if self._closed:
            raise RuntimeError("the vmfixtures session is closed")
        if self._pool is None:
            self.cache.ensure_writable()
            self.cache.clean_tmp()
            worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
            # Guests kept for a person to inspect must outlive pytest: no parent-death signal then.
            self._runtime = Runtime(self.settings.cache_dir, worker, die_with_parent=not self.settings.keep_on_failure)
            backend: Backend = self.config.hook.pytest_vm_make_backend(
                config=self.config, runtime=self._runtime, accel=self.accel
            )
            hook = self.config.hook
            self._pool = Pool(
                backend,
                self.cache,
                self._runtime,
                self.settings.image_dirs,
                accel=self.accel.accel,
                boot_timeout=self.settings.boot_timeout,
                command_timeout=self.settings.command_timeout,
                standby=self.settings.standby,
                provision=lambda vm: hook.pytest_vm_provision(vm=vm),
                provision_key=provision_fingerprint(self.config, self.settings.provision_key),
                ready=lambda vm: hook.pytest_vm_ready(vm=vm),
                progress=self.progress,
                resolve=lambda name: hook.pytest_vm_image_resolve(config=self.config, name=name),
                changes_ignore=self.settings.changes_ignore,
            )
        return self._pool

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            try:
                self._pool.close()
            except Exception as exc:
                log.warning("stopping guests failed: %s", exc)
        if self._runtime is not None and not (self._pool is not None and self._pool.kept):
            with contextlib.suppress(Exception):
                self._runtime.close()
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)


def missing_tools(settings: Settings) -> list[str]:
    """Host programs a guest test needs, with how to get each."""
    problems = []
    if settings.backend == "libvirt":
        if importlib.util.find_spec("libvirt") is None:
            problems.append("libvirt-python not installed: pip install 'pytest-vmfixtures[libvirt]' (needs libvirt-dev, pkg-config)")
    else:
        if shutil.which(settings.qemu_binary) is None:
            problems.append(f"{settings.qemu_binary} not found: install QEMU (Debian: apt install qemu-system-x86 qemu-utils)")
        if shutil.which("setpriv") is None:
            problems.append("setpriv not found: install util-linux")
    if shutil.which("qemu-img") is None:
        problems.append("qemu-img not found: install it (Debian: apt install qemu-utils)")
    return problems


def arch_problem(settings: Settings, name: str, arch: Arch) -> str | None:
    """Why image ``name`` of architecture ``arch`` cannot run here, with what to install; None if it can."""
    if arch.x86:
        return None  # the x86 emulator is checked for every run (missing_tools)
    if settings.backend == "libvirt":
        return (f"image {name!r} is {arch.debian}; the libvirt backend runs x86 guests only: "
                f"use --vm-backend qemu for it")
    binary = settings.qemu_binaries.get(arch.family, arch.qemu_binary)
    if shutil.which(binary) is None:
        return f"image {name!r} is {arch.debian}: {binary} not found: install it (Debian: apt install {arch.qemu_package})"
    missing = missing_firmware(arch)
    if missing:
        return (f"image {name!r} is {arch.debian}: its firmware {missing[0]} is missing: "
                f"install it (Debian: apt install {arch.firmware_package})")
    return None


def builtin_dirs(extra: list[Path]) -> list[Path]:
    """User recipe dirs first, so a user's recipe may shadow a built-in one."""
    return [*extra, BUILTIN_IMAGES_DIR]


def describe_settings(settings: Settings, accel: AccelChoice, **extra: Any) -> str:
    backend = settings.backend
    if backend == "libvirt":
        backend += " " + ",".join(settings.libvirt_uris or [DEFAULT_LIBVIRT_URI])
        if settings.libvirt_mode == "snapshot":
            backend += f" (snapshot mode, network {settings.libvirt_network})"
    words = [f"accel {accel.accel} ({accel.reason})", f"backend {backend}", f"cache {settings.cache_dir}"]
    words += [f"{k} {v}" for k, v in extra.items()]
    return "vmfixtures: " + ", ".join(words)
