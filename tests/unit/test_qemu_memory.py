"""backends/qemu/memory.py: which guests map their state's RAM, and the check before every restore."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from pytest_vmfixtures.backends.base import SavedState
from pytest_vmfixtures.backends.qemu import memory
from pytest_vmfixtures.errors import SnapshotError
from pytest_vmfixtures.images.image import BuiltImage, GuestOS


def image(tmp_path: Path, **changes: object) -> BuiltImage:
    built = BuiltImage(
        directory=tmp_path, name="debian-12", recipe_digest="0" * 64, disk=tmp_path / "disk.qcow2", disk_sha256="1" * 64,
        kernel=tmp_path / "vmlinuz", initrd=None, cmdline="", user="root", client_key=tmp_path / "key", host_key="",
        arch="x86_64", os=GuestOS(id="debian", version="12", init="systemd", package_manager="apt"), agent=True,
        built_at=0.0, builder_version="1",
    )
    return replace(built, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("setting", "version", "firmware_boot", "expected"),
    [
        ("auto", "7.2.19", False, "mapped"),
        ("auto", "7.2.19", True, "stream"),  # the balloon's discards would punch the shared file
        ("mapped", "7.2.19", True, "mapped"),  # asked for: the balloon goes instead
        ("stream", "9.2.0", False, "stream"),
        ("auto", "4.2.1", False, "stream"),  # no named memory backend for the machine before 5.0
        ("mapped", "4.2.1", False, "stream"),
        ("auto", "10.1.0", False, "mapped"),
    ],
)
def test_which_guests_map_their_ram(tmp_path: Path, setting: str, version: str, firmware_boot: bool, expected: str) -> None:
    built = image(tmp_path, kernel=None, firmware="bios") if firmware_boot else image(tmp_path)
    assert memory.chosen(setting, built, version) == expected


def test_only_qemu_8_2_opens_the_file_read_only() -> None:
    assert not memory.opens_read_only("7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)")
    assert memory.opens_read_only("8.2.0") and memory.opens_read_only("10.0.2")


def saved(tmp_path: Path) -> SavedState:
    directory = tmp_path / "state"
    directory.mkdir()
    boot_ram = tmp_path / "boot-ram"
    with open(boot_ram, "wb") as f:
        f.write(b"\0" * 65536 + b"kernel" + b"\0" * 65530)
    memory.freeze(boot_ram, directory)
    return SavedState(directory, directory / "disk.qcow2", directory / "memory", "debian-12-0123")


def test_freeze_moves_the_ram_private_and_sparse(tmp_path: Path) -> None:
    state = saved(tmp_path)
    ram = state.directory / memory.RAM_NAME
    assert memory.ram_of(state) == ram and not (tmp_path / "boot-ram").exists()
    assert ram.read_bytes()[65536:65542] == b"kernel" and ram.stat().st_size == 131072
    assert ram.stat().st_mode & 0o777 == 0o600
    checked, fd = memory.check(state)
    os.close(fd)
    assert checked == ram


def test_a_stream_state_has_no_ram_file(tmp_path: Path) -> None:
    assert memory.ram_of(SavedState(tmp_path, tmp_path / "disk.qcow2", tmp_path / "memory", "k")) is None


@pytest.mark.parametrize("fault", ["rewritten", "truncated", "deleted", "record-lost"])
def test_a_changed_ram_file_is_refused(tmp_path: Path, fault: str) -> None:
    state = saved(tmp_path)
    ram = state.directory / memory.RAM_NAME
    if fault == "rewritten":
        with open(ram, "r+b") as f:
            f.write(b"x")
        info = ram.stat()
        os.utime(ram, ns=(info.st_atime_ns, info.st_mtime_ns + 1))  # filesystems with coarse clocks
    elif fault == "truncated":
        os.truncate(ram, 4096)
    elif fault == "deleted":
        ram.unlink()
    else:
        (state.directory / memory.RAM_FINGERPRINT).write_text("{")
    with pytest.raises(SnapshotError, match="saved state debian-12-0123") as caught:
        memory.check(state)
    assert "\n" not in str(caught.value)


def test_the_checked_ram_file_is_the_one_qemu_maps(tmp_path: Path) -> None:
    """L3: QEMU gets the descriptor of the file check() looked at; replacing the path afterwards changes
    nothing, and a symlink in its place is refused (O_NOFOLLOW)."""
    state = saved(tmp_path)
    ram = state.directory / memory.RAM_NAME
    path, fd = memory.check(state)
    try:
        spec = memory.RamFile(path, shared=False, fd=fd).arguments(512)[1]
        assert f"mem-path=/proc/self/fd/{fd}," in spec and str(ram) not in spec
        original = os.fstat(fd).st_ino
        os.rename(ram, tmp_path / "elsewhere")
        ram.write_bytes(b"\0" * 131072)  # another file where the checked one was
        assert os.fstat(fd).st_ino == original and os.stat(f"/proc/self/fd/{fd}").st_ino == original
    finally:
        os.close(fd)
    ram.unlink()
    ram.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SnapshotError, match="cannot open its RAM file"):
        memory.check(state)


def test_the_fingerprint_records_what_the_save_wrote(tmp_path: Path) -> None:
    state = saved(tmp_path)
    recorded = json.loads((state.directory / memory.RAM_FINGERPRINT).read_text())
    assert recorded["size"] == 131072
