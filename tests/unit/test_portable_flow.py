"""The driver-neutral flow of snapshot mode, run against libvirt's own test driver (``test:///default``:
a hypervisor inside libvirt that keeps domains, states and snapshots in memory and runs nothing),
through the functions snapshot mode uses on every driver: the family's template (drivers.py), the
clean snapshot and its revert (snapshot.py), and the one teardown (teardown.drop_domain)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from disk_images import small_image

from pytest_vmfixtures.backends.libvirt import LibvirtMachine
from pytest_vmfixtures.backends.libvirt.connection import Host
from pytest_vmfixtures.backends.libvirt.convert import converted_disk
from pytest_vmfixtures.backends.libvirt.drivers import driver_for, portable_domain_xml
from pytest_vmfixtures.backends.libvirt.snapshot import CLEAN_SNAPSHOT, NAMED_PREFIX, revert_clean, take_clean, take_named
from pytest_vmfixtures.backends.libvirt.teardown import UNDEFINE_ALL, drop_domain
from pytest_vmfixtures.errors import SnapshotError
from pytest_vmfixtures.images.cache import Cache

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed: pip install -e '.[libvirt]'")

LIBVIRTS_TEST_DRIVER = "test:///default"
MAC = "52:54:00:5e:00:01"


@pytest.fixture
def conn() -> Iterator[Any]:
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(LIBVIRTS_TEST_DRIVER)
    before = {d.name() for d in conn.listAllDomains()}
    try:
        yield conn
        assert {d.name() for d in conn.listAllDomains()} == before  # nothing left behind
    finally:
        conn.close()


@pytest.fixture
def raw_disk(tmp_path: Path) -> str:
    """A real disk converted to the test driver's format (which it records and never opens)."""
    cache = Cache(tmp_path / "cache")
    cache.ensure_writable()
    return str(converted_disk(cache, small_image(tmp_path / "image"), driver_for(LIBVIRTS_TEST_DRIVER).disk_format))


def define(conn: Any, name: str, disk: str, firmware: str = "bios", **extra: object) -> Any:
    xml = portable_domain_xml(driver_for(LIBVIRTS_TEST_DRIVER), name=name, memory_mb=512, cpus=1, disk=disk, mac=MAC,
                              network="default", firmware=firmware, **extra)
    return conn.defineXML(xml)


def machine_of(conn: Any, domain: Any, files: Path) -> LibvirtMachine:
    host = Host(LIBVIRTS_TEST_DRIVER, conn, "test", "test")
    return LibvirtMachine(host, domain, str(domain.name()), files, 22, "<domain/>", False, files / "disk.raw",
                          str(files / "disk.raw"), on_stop=lambda machine: None)


def memory_kib(domain: Any) -> int:
    return int(domain.info()[2])


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_define_start_snapshot_change_revert_remove(conn: Any, raw_disk: str, firmware: str, tmp_path: Path) -> None:
    domain = define(conn, f"vmfx-portable-{firmware}", raw_disk, firmware, seed="/seeds/seed.iso")
    try:
        assert domain.isPersistent() and not domain.isActive()
        domain.create()
        machine = machine_of(conn, domain, tmp_path)
        assert machine.state() == "running"
        take_clean(machine)
        assert [s.getName() for s in domain.listAllSnapshots(0)] == [CLEAN_SNAPSHOT]

        # What a test changes, as libvirt sees it: less memory, and the guest paused.
        domain.setMemoryFlags(256 * 1024, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        domain.suspend()
        assert (memory_kib(domain), domain.state()[0]) == (256 * 1024, libvirt.VIR_DOMAIN_PAUSED)

        revert_clean(machine)
        assert (memory_kib(domain), domain.state()[0]) == (512 * 1024, libvirt.VIR_DOMAIN_RUNNING)
        revert_clean(machine)  # again: a clean state is used over and over
        assert domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    finally:
        assert drop_domain(domain) == []
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByName(f"vmfx-portable-{firmware}")
    assert drop_domain(domain) == []  # twice is fine


def test_a_revert_libvirt_refuses_is_one_line_and_cleanup_still_leaves_nothing(
    conn: Any, raw_disk: str, tmp_path: Path,
) -> None:
    domain = define(conn, "vmfx-portable-refused", raw_disk)
    try:
        domain.create()
        machine = machine_of(conn, domain, tmp_path)
        take_clean(machine)
        machine.snapshot.delete(0)  # gone under snapshot mode's feet, as an administrator might do on the host
        with pytest.raises(SnapshotError) as caught:
            revert_clean(machine)
        message = str(caught.value)
        assert "\n" not in message
        assert message.startswith("vmfx-portable-refused: the hypervisor did not revert domain vmfx-portable-refused "
                                  f"to snapshot {CLEAN_SNAPSHOT}: ")
        take_named(machine, "another")  # left for the teardown to delete
        assert [s.getName() for s in domain.listAllSnapshots(0)] == [f"{NAMED_PREFIX}another"]
    finally:
        assert drop_domain(domain) == []


def test_a_transient_domain_is_only_stopped(conn: Any, raw_disk: str) -> None:
    xml = portable_domain_xml(driver_for(LIBVIRTS_TEST_DRIVER), name="vmfx-portable-transient", memory_mb=256,
                              cpus=1, disk=raw_disk, mac=MAC, network="default", firmware="bios")
    domain = conn.createXML(xml, 0)
    assert drop_domain(domain) == []
    assert "vmfx-portable-transient" not in [d.name() for d in conn.listAllDomains(0)]


def refusal(code: int, message: str) -> Any:
    """libvirt's error as its driver raises it (code and message set, not this thread's last error)."""
    error = libvirt.libvirtError(message)
    error.err = (code, libvirt.VIR_FROM_DOMAIN, message, libvirt.VIR_ERR_ERROR, None, None, None, 0, 0)
    return error


class FakeDomain:
    """A FAKE persistent domain: the undefine refusals of drivers this machine cannot run (ESX refuses every
    undefine flag) or cannot be made to refuse on cue (QEMU's plain undefine of a guest with an NVRAM)."""

    def __init__(self, refuse_plain: bool, refuse_flags: bool) -> None:
        self.refuse_plain, self.refuse_flags = refuse_plain, refuse_flags
        self.calls: list[str] = []

    def name(self) -> str:
        return "vmfx-fake"

    def connect(self) -> Any:
        return self

    def isAlive(self) -> bool:  # noqa: N802
        return True

    def isPersistent(self) -> bool:  # noqa: N802
        return True

    def isActive(self) -> bool:  # noqa: N802
        return False

    def listAllSnapshots(self, flags: int) -> list[Any]:  # noqa: N802
        return []

    def undefine(self) -> int:
        self.calls.append("undefine")
        if self.refuse_plain:
            raise refusal(libvirt.VIR_ERR_OPERATION_INVALID, "Requested operation is not valid: cannot undefine "
                                                             "domain with nvram")
        return 0

    def undefineFlags(self, flags: int) -> int:  # noqa: N802
        self.calls.append(f"undefineFlags({flags})")
        if self.refuse_flags:
            raise refusal(libvirt.VIR_ERR_INVALID_ARG, "unsupported flags (0x3f) in function esxDomainUndefineFlags")
        return 0


def test_the_one_teardown_undefines_plainly_first_and_with_flags_only_if_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    esx_like = FakeDomain(refuse_plain=False, refuse_flags=True)
    assert drop_domain(esx_like) == []
    assert esx_like.calls == ["undefine"]  # no flag ever reaches a driver that refuses them all

    nvram_guest = FakeDomain(refuse_plain=True, refuse_flags=False)
    assert drop_domain(nvram_guest) == []
    assert nvram_guest.calls == ["undefine", f"undefineFlags({UNDEFINE_ALL})"]

    stuck = FakeDomain(refuse_plain=True, refuse_flags=True)
    with caplog.at_level(logging.WARNING, logger="pytest_vmfixtures"):
        problems = drop_domain(stuck)
    assert len(problems) == 1 and "\n" not in problems[0]
    assert problems[0].startswith("vmfx-fake: undefining the domain refused by libvirt: ")
    assert "undefining the domain with its NVRAM and metadata refused by libvirt: unsupported flags" in problems[0]
    assert problems[0] in caplog.text
