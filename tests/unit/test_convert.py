"""Disk conversion for the portable libvirt path: real qemu-img on a small real disk, once per
(disk digest, format), never reusing a damaged or half-made conversion."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from disk_images import small_image

from pytest_vmfixtures.backends.libvirt.convert import KIND, conversion_key, converted_disk
from pytest_vmfixtures.errors import ImageError
from pytest_vmfixtures.images.cache import STAMP, Cache, sha256_file
from pytest_vmfixtures.images.image import BuiltImage


def same_contents(image: BuiltImage, converted: Path, disk_format: str) -> bool:
    result = subprocess.run(["qemu-img", "compare", "-q", "-f", image.disk_format, "-F", disk_format,
                             str(image.disk), str(converted)], timeout=120)
    return result.returncode == 0


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    cache = Cache(tmp_path / "cache")
    cache.ensure_writable()
    return cache


@pytest.mark.parametrize("disk_format", ["vmdk", "vdi", "vhdx", "raw"])
def test_a_disk_is_converted_once_and_holds_the_same_bytes(cache: Cache, tmp_path: Path, disk_format: str) -> None:
    image = small_image(tmp_path / "image")
    told: list[str] = []
    converted = converted_disk(cache, image, disk_format, progress=told.append)
    assert converted == cache.root / KIND / conversion_key(image, disk_format) / f"disk.{disk_format}"
    info = subprocess.run(["qemu-img", "info", "--output=json", str(converted)], capture_output=True, text=True,
                          check=True, timeout=60).stdout
    assert f'"format": "{disk_format}"' in info
    assert same_contents(image, converted, disk_format)
    assert converted.stat().st_mode & 0o222 == 0  # read-only once made (the mode bits: root could write anyway)
    assert any("converting small's disk" in m for m in told)
    # Another process (a new Cache) finds it, checks it and converts nothing.
    before = converted.stat().st_mtime_ns
    again: list[str] = []
    assert converted_disk(Cache(cache.root), image, disk_format, progress=again.append) == converted
    assert again == [] and converted.stat().st_mtime_ns == before


def test_vmdk_is_one_sparse_file_for_vmware_with_an_lsilogic_adapter(cache: Cache, tmp_path: Path) -> None:
    converted = converted_disk(cache, small_image(tmp_path / "image"), "vmdk")
    header = converted.read_bytes()[:4096]
    assert b'createType="monolithicSparse"' in header
    assert b'ddb.adapterType = "lsilogic"' in header
    # one disk file (no extents beside it), its manifest and the cache's stamp of digests found right
    assert sorted(p.name for p in converted.parent.iterdir()) == [STAMP, "disk.vmdk", "manifest.json"]


def test_the_same_format_needs_no_conversion(cache: Cache, tmp_path: Path) -> None:
    image = small_image(tmp_path / "image")
    assert converted_disk(cache, image, "qcow2") == image.disk
    raw = small_image(tmp_path / "raw-image", disk_format="raw")
    assert converted_disk(cache, raw, "raw") == raw.disk
    assert not (cache.root / KIND).exists() or not any((cache.root / KIND).iterdir())


def test_a_damaged_conversion_is_not_reused(cache: Cache, tmp_path: Path) -> None:
    image = small_image(tmp_path / "image")
    converted = converted_disk(cache, image, "vdi")
    converted.chmod(0o644)
    with open(converted, "r+b") as f:  # cut short, as a full disk or a killed copy would leave it
        f.truncate(converted.stat().st_size // 2)
    told: list[str] = []
    again = converted_disk(Cache(cache.root), image, "vdi", progress=told.append)
    assert again == converted
    assert any("converting" in m for m in told)
    assert same_contents(image, again, "vdi")


def test_an_entry_without_its_manifest_is_made_again(cache: Cache, tmp_path: Path) -> None:
    """A stand-in for an entry whose manifest was never written (a fake of a crash at that moment)."""
    image = small_image(tmp_path / "image")
    converted = converted_disk(cache, image, "vhdx")
    (converted.parent / "manifest.json").unlink()
    assert converted_disk(Cache(cache.root), image, "vhdx") == converted
    assert (converted.parent / "manifest.json").is_file()
    assert same_contents(image, converted, "vhdx")


def test_a_half_made_conversion_in_tmp_is_never_used_and_is_cleaned(cache: Cache, tmp_path: Path) -> None:
    """A stand-in for a run killed mid-conversion: its work directory, with half a file, is left in tmp/."""
    image = small_image(tmp_path / "image")
    leftover = cache.root / "tmp" / f"{KIND}--{conversion_key(image, 'vmdk')}-deadbeef"
    leftover.mkdir(parents=True)
    (leftover / "disk.vmdk").write_bytes(b"KDMV" + b"\0" * 1000)
    converted = converted_disk(cache, image, "vmdk")
    assert leftover not in converted.parents
    assert same_contents(image, converted, "vmdk")
    assert cache.clean_tmp() == [leftover.name]


def test_a_conversion_qemu_img_cannot_do_is_one_clear_error_and_leaves_nothing(cache: Cache, tmp_path: Path) -> None:
    image = small_image(tmp_path / "image")
    broken = tmp_path / "not-a-disk.qcow2"
    broken.write_text("this is not a qcow2 image\n")
    bad = BuiltImage(**{**image.__dict__, "disk": broken, "disk_sha256": sha256_file(broken)})
    with pytest.raises(ImageError, match=r"qemu-img could not convert .*not-a-disk\.qcow2 \(qcow2\) to vdi"):
        converted_disk(cache, bad, "vdi")
    assert not any((cache.root / KIND).iterdir())
    assert not any((cache.root / "tmp").iterdir())


def test_an_unknown_format_is_refused(cache: Cache, tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"no conversion to 'vhd': the portable path converts to raw, vdi, vhdx, vmdk"):
        converted_disk(cache, small_image(tmp_path / "image"), "vhd")
