"""pytest-vmfixtures' entry point: options, marker, hooks into pytest's lifecycle."""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from . import hookspecs
from .accel import AccelChoice
from .backends.base import Backend
from .backends.libvirt.uris import DEFAULT_LIBVIRT_NETWORK, DEFAULT_LIBVIRT_POOL, DEFAULT_LIBVIRT_URI
from .changes_report import add_changes_sections
from .command import DEFAULT_COMMAND_TIMEOUT
from .consolelog import console_tail
from .doctor import LIBVIRT_KVM, WARN, run_checks, summary
from .errors import ImageError
from .fixtures import EVIDENCE_KEY, FAILED_KEY, HELD_KEY, SESSION_KEY, _vm_image, marker_spec, vm, vm_factory, vm_network  # noqa: F401
from .guest import VM
from .images.byo import is_byo
from .images.cache import default_cache_dir
from .images.catalog import available_recipes
from .options import (
    DEFAULT_IMAGE,
    OptionError,
    image_matrix,
    parse_accel,
    parse_backend,
    parse_changes_ignore,
    parse_choice,
    parse_libvirt_mode,
    parse_positive,
    parse_qemu_binaries,
    parse_ram_state,
    parse_standby,
)
from .preflight import UNAVAILABLE, apply, host_problems
from .reports import JunitAttachments, add_html_extras, add_sections, html_plugin_state
from .runtime import Runtime
from .session import Settings, VMSession, builtin_dirs, describe_settings

GUEST_FIXTURES = ("vm", "vm_factory", "vm_network")

# (option, ini name, ini type, default, help)
_OPTIONS: list[tuple[str, str, str, Any, str]] = [
    ("--vm-image", "vm_images", "args", [], "run unpinned vm tests on this image (repeatable)"),
    ("--vm-images-dir", "vm_images_dir", "paths", [], "extra directory of image recipes (repeatable)"),
    ("--vm-accel", "vm_accel", "string", "auto", "auto, kvm or tcg; auto uses KVM only where it runs stock guests"),
    ("--vm-cache", "vm_cache", "string", "", "cache of built images and saved guest states"),
    ("--vm-boot-timeout", "vm_boot_timeout", "string", "600", "seconds a cold boot may take before BootError"),
    ("--vm-command-timeout", "vm_command_timeout", "string", f"{DEFAULT_COMMAND_TIMEOUT:g}",
     "seconds vm.run, vm.put and vm.get given no timeout may take before CommandTimeout"),
    ("--vm-backend", "vm_backend", "string", "qemu", "what runs guests: qemu (embedded) or libvirt"),
    ("--vm-libvirt-uri", "vm_libvirt_uris", "args", [], "libvirt URI the libvirt backend uses (repeatable: guests go to the least loaded)"),
    ("--vm-libvirt-pool", "vm_libvirt_pool", "string", DEFAULT_LIBVIRT_POOL, "storage pool that remote libvirt hosts keep copies in"),
    ("--vm-ram-state", "vm_ram_state", "string", "auto",
     "how the qemu backend's saved states keep guest RAM: mapped (a file guests map copy-on-write), "
     "stream (read into each guest) or auto (mapped where QEMU can, stream for guests with a balloon)"),
    ("--vm-standby", "vm_standby", "string", "auto",
     "clean spare guests restored in the background per config: auto (one, two once a config is reverted often), N, or 0 (revert in line)"),
    ("--vm-libvirt-mode", "vm_libvirt_mode", "string", "",
     "libvirt: saved-state (QEMU's saved state, QEMU driver only) or snapshot (a hypervisor snapshot per guest)"),
    ("--vm-libvirt-network", "vm_libvirt_network", "string", DEFAULT_LIBVIRT_NETWORK,
     "libvirt snapshot mode: the libvirt network guests are reached on (it must exist and be active)"),
    ("--vm-qemu-binary", "vm_qemu_binary", "args", [],
     "the QEMU system emulator for x86 guests, or ARCH=PATH for another architecture's (repeatable)"),
    ("--vm-provision-key", "vm_provision_key", "string", "", "extra text in the ready state's cache key (change it to provision anew)"),
    ("--vm-artifacts", "vm_artifacts", "string", "", "where failed tests' console logs, screendumps and journals go"),
    ("--vm-keep-on-failure", "vm_keep_on_failure", "bool", False, "keep a failed test's guest running after the run; prints how to ssh in"),
    ("--vm-unavailable", "vm_unavailable", "string", "error",
     "when this host cannot run the run's guests (no QEMU, say): error (stop the run, naming the fix) or skip "
     "(skip the tests that need a guest, run the rest)"),
    ("--vm-report-changes", "vm_report_changes", "bool", False,
     "add a 'vm changes' section to each failed guest test's report: what the test changed in its guest (vm.changes())"),
]


_DEFAULT_TEXT = {
    "vm_images": "debian-12",
    "vm_cache": "~/.cache/pytest-vmfixtures",
    "vm_artifacts": "vm-artifacts beside --junitxml's file, else beside --html's, else under pytest's basetemp",
    "vm_libvirt_uris": DEFAULT_LIBVIRT_URI,
    "vm_qemu_binary": "qemu-system-ARCH from PATH",
    "vm_libvirt_mode": "saved-state on qemu:// URIs, snapshot on other drivers'",
}


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vmfixtures", "virtual machine fixtures")
    for option, ini, kind, default, text in _OPTIONS:
        shown = default if default not in ([], "") else _DEFAULT_TEXT.get(ini, "none")
        help_text = f"{text} (ini: {ini}; default: {shown})"
        if kind == "bool":
            group.addoption(option, action="store_true", default=None, dest=ini, help=help_text)
        elif kind in ("args", "paths"):
            metavar = {"vm_images": "NAME", "vm_libvirt_uris": "URI", "vm_qemu_binary": "[ARCH=]PATH"}.get(ini, "DIR")
            group.addoption(option, action="append", default=[], dest=ini, metavar=metavar, help=help_text)
        else:
            group.addoption(option, default=None, dest=ini, help=help_text)
        parser.addini(ini, help=help_text, type=kind, default=default)  # type: ignore[arg-type]
    parser.addini("vm_changes_ignore", type="linelist", default=[],
                  help="glob patterns of guest paths vm.changes() leaves out, one a line, on top of its defaults")


def _value(config: pytest.Config, ini: str) -> Any:
    cli = config.getoption(ini)
    if cli not in (None, []):
        return cli
    return config.getini(ini)


def _settings(config: pytest.Config) -> Settings:
    try:
        qemu_binary, qemu_binaries = parse_qemu_binaries(_value(config, "vm_qemu_binary"))
        cache = _value(config, "vm_cache")
        rootdir = config.rootpath
        dirs = [Path(p) if Path(p).is_absolute() else rootdir / p for p in config.getoption("vm_images_dir")]
        dirs += [Path(p) for p in config.getini("vm_images_dir")]
        uris = [u for u in (config.getoption("vm_libvirt_uris") or config.getini("vm_libvirt_uris")) if u]
        return Settings(
            images=image_matrix(config.getoption("vm_images"), config.getini("vm_images")),
            image_dirs=builtin_dirs(dirs),
            accel=parse_accel(str(_value(config, "vm_accel"))),
            cache_dir=Path(cache).expanduser() if cache else default_cache_dir(),
            boot_timeout=parse_positive("--vm-boot-timeout", _value(config, "vm_boot_timeout")),
            command_timeout=parse_positive("--vm-command-timeout", _value(config, "vm_command_timeout")),
            backend=parse_backend(str(_value(config, "vm_backend"))),
            standby=parse_standby(_value(config, "vm_standby")),
            ram_state=parse_ram_state(str(_value(config, "vm_ram_state"))),
            qemu_binary=qemu_binary,
            qemu_binaries=qemu_binaries,
            provision_key=str(_value(config, "vm_provision_key") or ""),
            artifacts=Path(str(_value(config, "vm_artifacts"))).expanduser() if _value(config, "vm_artifacts") else None,
            keep_on_failure=bool(_value(config, "vm_keep_on_failure")),
            libvirt_uris=uris,
            libvirt_pool=str(_value(config, "vm_libvirt_pool") or DEFAULT_LIBVIRT_POOL),
            libvirt_mode=parse_libvirt_mode(str(_value(config, "vm_libvirt_mode") or ""), uris or [DEFAULT_LIBVIRT_URI]),
            libvirt_network=str(_value(config, "vm_libvirt_network") or DEFAULT_LIBVIRT_NETWORK),
            unavailable=parse_choice("--vm-unavailable", str(_value(config, "vm_unavailable")), UNAVAILABLE),
            changes_ignore=parse_changes_ignore(config.getini("vm_changes_ignore")),
            report_changes=bool(_value(config, "vm_report_changes")),
        )
    except OptionError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "vm(image=None, images=None, memory_mb=512, cpus=1, network='restricted', sha256=None, user=None, firmware=None, "
        "needs=()): "
        "configure the guest the vm fixture gives this test (pytest-vmfixtures)",
    )
    config.stash[SESSION_KEY] = VMSession(config, _settings(config))
    config.pluginmanager.register(JunitAttachments(config), "vmfixtures-junit-attachments")


def pytest_report_header(config: pytest.Config) -> list[str]:
    session = config.stash[SESSION_KEY]
    settings = session.settings
    # No version probes here: every pytest start shows this line, guest tests or not.
    libvirt = settings.backend == "libvirt"
    checks = run_checks(settings.cache_dir, settings.accel, settings.qemu_binary,
                        settings.libvirt_uris if libvirt else (), versions=False,
                        libvirt_pool=settings.libvirt_pool,
                        libvirt_network=settings.libvirt_network if libvirt and settings.libvirt_mode == "snapshot" else None,
                        images=settings.images, image_dirs=settings.image_dirs, backend=settings.backend,
                        qemu_binaries=settings.qemu_binaries)
    lines = [describe_settings(settings, session.accel, images=",".join(settings.images)), f"vmfixtures: {summary(checks)}"]
    # A cost this large is said in full at the start, once, not only counted in the summary.
    lines += [f"vmfixtures: warning: {c.message}" for c in checks if c.name == LIBVIRT_KVM and c.status == WARN]
    html = html_plugin_state(config)
    if html:  # --html asked for, but this pytest-html cannot carry the evidence
        lines.append(f"vmfixtures: warning: {html}")
    return lines


@pytest.hookimpl(trylast=True)
def pytest_vm_make_backend(config: pytest.Config, runtime: Runtime, accel: AccelChoice) -> Backend:
    settings = config.stash[SESSION_KEY].settings
    if settings.backend == "libvirt":
        from .backends.libvirt import LibvirtBackend

        return LibvirtBackend(runtime, accel, settings.libvirt_uris or None, pool=settings.libvirt_pool,
                              progress=config.stash[SESSION_KEY].progress, mode=settings.libvirt_mode,
                              network=settings.libvirt_network, boot_timeout=settings.boot_timeout)
    from .backends.qemu import QemuBackend

    return QemuBackend(runtime, accel, binary=settings.qemu_binary, binaries=settings.qemu_binaries,
                       ram_state=settings.ram_state)


def _uses_guests(fixturenames: Any) -> bool:
    return any(name in fixturenames for name in GUEST_FIXTURES)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "_vm_image" not in metafunc.fixturenames:
        return
    try:
        spec = marker_spec(metafunc.definition)
    except pytest.UsageError as exc:
        raise pytest.Collector.CollectError(str(exc)) from None
    if spec.image is not None:
        return  # pinned: no matrix
    session = metafunc.config.stash[SESSION_KEY]
    params = []
    for name in session.settings.images:
        marks = []
        if spec.images is not None and name not in spec.images:
            marks.append(pytest.mark.skip(reason=f"runs only on images {', '.join(spec.images)}, not {name}"))
        params.append(pytest.param(name, id=name, marks=marks))
    metafunc.parametrize("_vm_image", params)


def _known_images(session: VMSession) -> dict[str, Path]:
    try:
        return available_recipes(session.settings.image_dirs)
    except ImageError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Check once, before the first test, that this host can run the guests the collected tests ask for."""
    vms = config.stash[SESSION_KEY]
    wanted: set[str] = set()
    guest_items: list[tuple[pytest.Item, str]] = []
    for item in items:
        if not _uses_guests(getattr(item, "fixturenames", ())):
            continue
        spec = marker_spec(item)
        callspec = getattr(item, "callspec", None)
        image = spec.image or (callspec.params.get("_vm_image") if callspec else None) or DEFAULT_IMAGE
        if not any(m.name == "skip" for m in item.iter_markers()):
            wanted.add(image)
            guest_items.append((item, image))
        for name in spec.images or ():
            wanted.add(name)
    if not wanted:
        return
    known = _known_images(vms)
    for name in sorted(wanted):
        if name not in known and not is_byo(name) and config.hook.pytest_vm_image_resolve(config=config, name=name) is None:
            raise pytest.UsageError(
                f"unknown image {name!r}; available: {', '.join(sorted(known))} "
                "(or add a recipe NAME.toml with --vm-images-dir DIR)"
            )
    recipes = {name for name in wanted if name in known}
    problems = host_problems(vms.settings, vms.cache, recipes, rootless=os.geteuid() != 0)
    apply(problems, guest_items, vms.settings.unavailable)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    guests = item.stash.get(HELD_KEY, [])
    if guests and report.when == "call":
        _record_guests(item, guests)
    if report.failed:
        item.stash[FAILED_KEY] = True
        for guest in guests:
            try:
                tail = console_tail(guest.console_log, 30)
            except Exception:
                continue
            # The section shows in the terminal report; the property carries the same tail into
            # JUnit XML whatever junit_logging says.
            tail = tail or "(nothing on the console)"
            report.sections.append((f"Captured stdout {report.when}: vm {guest.name} console, last 30 lines", tail))
            item.user_properties.append((f"vm {guest.name} console ({report.when})", tail))
        if report.when != "teardown" and item.config.stash[SESSION_KEY].settings.report_changes:
            held: list[VM] = item.stash.get(HELD_KEY, [])
            add_changes_sections(report, item, held)
    evidence = item.stash.get(EVIDENCE_KEY, [])
    if report.when == "teardown" and evidence:  # collected in the guest fixtures' teardown, before the revert
        add_sections(report, evidence)
        if html_plugin_state(item.config) is None:
            add_html_extras(report, evidence)
    return report


def _record_guests(item: pytest.Item, guests: list[Any]) -> None:
    """JUnit properties naming each guest's image, backend and accelerator (once per test)."""
    backend = item.config.stash[SESSION_KEY].pool.backend.name
    for guest in guests:
        for key, value in (("image", guest.image), ("backend", backend), ("accelerator", guest.accel)):
            item.user_properties.append((f"vm {guest.name} {key}", value))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    session = config.stash[SESSION_KEY]
    channels = session.channel_line()
    if channels is not None:
        terminalreporter.write_line(channels)
    for line in session.kept_guest_lines():
        terminalreporter.write_line(line, yellow=True)
    if session.artifacts_written:
        terminalreporter.write_line(f"vmfixtures: evidence of failed tests in {session.artifacts_root()}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[SESSION_KEY].close()
