"""The driver-neutral flow of the portable path, run once against libvirt's own test driver
(``test:///default``: a hypervisor inside libvirt that keeps domains, states and snapshots in memory
and runs nothing), through the same functions the snapshot mode uses on every driver."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from disk_images import small_image

from pytest_vmfixtures.backends.libvirt import portable
from pytest_vmfixtures.backends.libvirt.convert import converted_disk
from pytest_vmfixtures.backends.libvirt.drivers import driver_for
from pytest_vmfixtures.errors import GuestError
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


def memory_kib(domain: Any) -> int:
    return int(domain.info()[2])


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_define_start_snapshot_change_revert_remove(conn: Any, raw_disk: str, firmware: str) -> None:
    driver = driver_for(LIBVIRTS_TEST_DRIVER)
    domain = portable.define_from_template(conn, driver, name=f"vmfx-portable-{firmware}", memory_mb=512, cpus=1,
                                           disk=raw_disk, mac=MAC, network="default", firmware=firmware,
                                           seed="/seeds/seed.iso")
    try:
        assert domain.isPersistent() and not domain.isActive()
        portable.start(domain)
        assert domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        clean = portable.take_clean_snapshot(domain)
        assert [s.getName() for s in domain.listAllSnapshots(0)] == [portable.CLEAN]

        # What a test changes, as libvirt sees it: less memory, and the guest paused.
        domain.setMemoryFlags(256 * 1024, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        domain.suspend()
        assert (memory_kib(domain), domain.state()[0]) == (256 * 1024, libvirt.VIR_DOMAIN_PAUSED)

        portable.revert(domain, clean)
        assert (memory_kib(domain), domain.state()[0]) == (512 * 1024, libvirt.VIR_DOMAIN_RUNNING)
        portable.revert(domain, clean)  # again: a clean state is used over and over
        assert domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    finally:
        assert portable.remove(domain) == []
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByName(f"vmfx-portable-{firmware}")
    assert portable.remove(domain) == []  # twice is fine


def test_a_revert_libvirt_refuses_is_one_line_and_cleanup_still_leaves_nothing(conn: Any, raw_disk: str) -> None:
    domain = portable.define_from_template(conn, driver_for(LIBVIRTS_TEST_DRIVER), name="vmfx-portable-refused",
                                           memory_mb=256, cpus=1, disk=raw_disk, mac=MAC, network="default",
                                           firmware="bios")
    try:
        portable.start(domain)
        clean = portable.take_clean_snapshot(domain)
        clean.delete(0)  # gone under the snapshot mode's feet, as an administrator might do on the host
        with pytest.raises(GuestError) as caught:
            portable.revert(domain, clean)
        message = str(caught.value)
        assert "\n" not in message
        assert message.startswith(f"vmfx-portable-refused: reverting to snapshot {portable.CLEAN} refused by libvirt: ")
        portable.take_clean_snapshot(domain, "another")  # left for remove() to delete
    finally:
        assert portable.remove(domain) == []


def test_a_domain_libvirt_refuses_to_define_is_one_line(conn: Any) -> None:
    with pytest.raises(GuestError, match=r"^vmfx-portable-bad: defining the domain refused by libvirt: .*mac address 'not-a-mac'$"):
        portable.define_from_template(conn, driver_for(LIBVIRTS_TEST_DRIVER), name="vmfx-portable-bad",
                                      memory_mb=256, cpus=1, disk="/x.raw", mac="not-a-mac", network="default",
                                      firmware="bios")
