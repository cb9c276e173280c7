"""Your own image: the seed ISO, the checked download, firmware detection, marker rules."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pycdlib
import pytest

from pytest_vmfixtures.backends.base import MachineConfig, config_inputs
from pytest_vmfixtures.errors import ImageError
from pytest_vmfixtures.images.byo import (
    BIOS_BOOT_GUIDS,
    ESP_GUID,
    ByoSpec,
    boot_problem,
    cached_download,
    detect_firmware,
    download,
    hostname_for,
    imported_copy,
    is_byo,
    make_seed,
    prepare,
)
from pytest_vmfixtures.images.cache import Cache
from pytest_vmfixtures.options import OptionError, parse_marker

SHA = "ab" * 32


def _read(iso: pycdlib.PyCdlib, rr_path: str) -> str:
    out = io.BytesIO()
    iso.get_file_from_iso_fp(out, rr_path=rr_path)
    return out.getvalue().decode()


def test_seed_iso_is_a_cidata_volume_with_the_keys(tmp_path: Path) -> None:
    make_seed(tmp_path, SHA, "vmfix")
    iso = pycdlib.PyCdlib()
    iso.open(str(tmp_path / "seed.iso"))
    try:
        assert iso.pvd.volume_identifier.decode().strip() == "cidata"
        names = {child.rock_ridge.name().decode() for child in iso.list_children(rr_path="/") if child.rock_ridge}
        assert {"meta-data", "user-data"} <= names
        meta = _read(iso, "/meta-data")
        user = _read(iso, "/user-data")
    finally:
        iso.close()
    assert f"local-hostname: {hostname_for(SHA)}" in meta and "instance-id:" in meta
    assert user.startswith("#cloud-config\n")
    client_public = (tmp_path / "id_ed25519.pub").read_text().strip()
    host_public = (tmp_path / "ssh_host_ed25519_key.pub").read_text().strip()
    assert client_public in user and host_public in user
    assert "ed25519_private" in user and '"ssh_pwauth": false' in user and '"name": "vmfix"' in user
    assert (tmp_path / "seed.iso").stat().st_mode & 0o077 == 0  # it holds the host's private key


def test_root_user_seed_creates_no_user(tmp_path: Path) -> None:
    make_seed(tmp_path, SHA, "root")
    iso = pycdlib.PyCdlib()
    iso.open(str(tmp_path / "seed.iso"))
    user = _read(iso, "/user-data")
    iso.close()
    assert '"users": []' in user and '"disable_root": false' in user


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    payload = uuid.uuid4().bytes * 300_000  # 4.8 MB, several chunks
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "disk.qcow2").write_bytes(payload)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path / "www")))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/disk.qcow2", payload
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_download_checks_the_digest_while_streaming(tmp_path: Path, server: tuple[str, bytes]) -> None:
    url, payload = server
    messages: list[str] = []
    target = tmp_path / "good"
    download(url, hashlib.sha256(payload).hexdigest(), target, messages.append)
    assert target.read_bytes() == payload
    assert "checksum verified" in messages[-1]
    with pytest.raises(ImageError, match="not the expected"):
        download(url, SHA, tmp_path / "bad", messages.append)
    assert not (tmp_path / "bad").exists()


def test_cached_download_once_and_mismatch_leaves_nothing(tmp_path: Path, server: tuple[str, bytes]) -> None:
    url, payload = server
    cache = Cache(tmp_path / "cache")
    cache.ensure_writable()
    with pytest.raises(ImageError):
        cached_download(cache, url, SHA, lambda m: None)
    assert not (cache.root / "downloads" / SHA).exists()
    assert list((cache.root / "tmp").iterdir()) == []
    digest = hashlib.sha256(payload).hexdigest()
    path = cached_download(cache, url, digest, lambda m: None)
    assert path.read_bytes() == payload and path.parent == cache.root / "downloads" / digest
    # A damaged cached copy is found on first use in a new run and fetched again.
    path.chmod(0o644)
    path.write_bytes(b"corrupt")
    again = cached_download(Cache(cache.root), url, digest, lambda m: None)
    assert again.read_bytes() == payload


def _gpt(*types: str) -> bytes:
    head = bytearray(34 * 512)
    head[510:512] = b"\x55\xaa"
    head[512:520] = b"EFI PART"
    head[512 + 72 : 512 + 80] = (2).to_bytes(8, "little")
    head[512 + 80 : 512 + 84] = (128).to_bytes(4, "little")
    head[512 + 84 : 512 + 88] = (128).to_bytes(4, "little")
    for index, kind in enumerate(types):
        offset = 2 * 512 + index * 128
        head[offset : offset + 16] = uuid.UUID(kind).bytes_le
    return bytes(head)


def test_firmware_detection() -> None:
    linux = "0fc63daf-8483-4772-8e79-3d69d8477de4"
    bios_boot = sorted(BIOS_BOOT_GUIDS)[0]
    assert detect_firmware(_gpt(ESP_GUID, linux)) == "uefi"
    assert detect_firmware(_gpt(bios_boot, ESP_GUID, linux)) == "bios"  # hybrid: SeaBIOS is the faster start
    assert detect_firmware(_gpt(linux)) == "bios"
    mbr = bytearray(34 * 512)
    mbr[510:512] = b"\x55\xaa"
    mbr[446 + 4] = 0x83
    assert detect_firmware(bytes(mbr)) == "bios"
    assert detect_firmware(b"") == "bios"


def test_what_counts_as_your_own_image() -> None:
    assert is_byo("https://example.org/x.qcow2") and is_byo("images/x") and is_byo("x.img") and is_byo("x.raw")
    assert not is_byo("debian-12")


def test_marker_rules() -> None:
    spec = parse_marker("t", [((), {"image": "https://e.org/x.qcow2", "sha256": SHA.upper(), "user": "root"})])
    assert spec.sha256 == SHA and spec.user == "root"
    assert parse_marker("t", [((), {"image": "./x.qcow2"})]).sha256 is None  # optional for paths
    for kwargs, message in (
        ({"image": "https://e.org/x.qcow2"}, "give its sha256"),
        ({"image": "x.qcow2", "sha256": "12"}, "64 hex"),
        ({"image": "debian-12", "sha256": SHA}, "only to your own image"),
        ({"sha256": SHA}, "need image="),
        ({"image": "x.qcow2", "firmware": "coreboot"}, "firmware"),
        ({"image": "x.qcow2", "user": "Bad User"}, "user must be"),
    ):
        with pytest.raises(OptionError, match=message):
            parse_marker("t", [((), kwargs)])


def test_state_key_inputs() -> None:
    # Recipe images keep their keys; a URL is known by its digest, not where it was served from.
    assert config_inputs(MachineConfig("debian-12")) == {"image": "debian-12", "memory_mb": 512, "cpus": 1, "network": "restricted"}
    one = MachineConfig("http://127.0.0.1:1/x.qcow2", sha256=SHA)
    two = MachineConfig("http://127.0.0.1:2/x.qcow2", sha256=SHA)
    assert config_inputs(one) == config_inputs(two) and one.label == two.label == f"x-{SHA[:8]}"


def test_a_local_disk_is_booted_from_a_private_copy_of_the_bytes_that_were_hashed(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    cache.ensure_writable()
    source = tmp_path / "mine.qcow2"
    source.write_bytes(b"disk one" * 1000)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    copy, sha = imported_copy(cache, source, None, lambda m: None)
    assert sha == digest and copy.parent == cache.root / "downloads" / digest and copy.read_bytes() == source.read_bytes()
    assert copy.stat().st_mode & 0o222 == 0
    # The user's file changes after the check: guests keep the bytes that were checked.
    source.write_bytes(b"disk two" * 1000)
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == digest
    # Asked for by digest, the cached copy is found without reading the (changed) file.
    assert imported_copy(Cache(cache.root), source, digest.upper(), lambda m: None) == (copy, digest)


def test_a_local_disk_that_does_not_match_its_digest_leaves_nothing(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    cache.ensure_writable()
    source = tmp_path / "mine.img"
    source.write_bytes(b"x" * 4096)
    with pytest.raises(ImageError, match="not the expected"):
        imported_copy(cache, source, SHA, lambda m: None)
    assert not (cache.root / "downloads" / SHA).exists()
    assert list((cache.root / "tmp").iterdir()) == []


@pytest.mark.parametrize(("name", "body"), [
    ("index.html", b"<html><body>the download page</body></html>"),  # served as text/html
    ("disk.qcow2", b"\n  <!DOCTYPE html>\n<html><head><title>Not here</title></head></html>"),  # a page under a disk's name
])
def test_a_url_that_serves_a_web_page_is_refused_and_leaves_nothing(tmp_path: Path, name: str, body: bytes) -> None:
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / name).write_bytes(body)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    cache = Cache(tmp_path / "cache")
    cache.ensure_writable()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/{name}"
        with pytest.raises(ImageError, match="serves a web page.*not a disk image: give the URL of the .qcow2"):
            cached_download(cache, url, hashlib.sha256(body).hexdigest(), lambda m: None)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert not (cache.root / "downloads" / hashlib.sha256(body).hexdigest()).exists()
    assert list((cache.root / "tmp").iterdir()) == []


def test_what_each_firmware_can_boot() -> None:
    mbr = bytes(510) + b"\x55\xaa" + bytes(33 * 512)
    assert boot_problem(mbr, "bios") is None and boot_problem(mbr, "uefi") is None
    gpt = _gpt(ESP_GUID)
    assert boot_problem(gpt, "uefi") is None and boot_problem(gpt, "bios") is None  # a protective MBR is signed
    unsigned_gpt = bytes(512) + gpt[512:]
    assert boot_problem(unsigned_gpt, "uefi") is None
    assert "no boot signature" in str(boot_problem(unsigned_gpt, "bios"))
    blank = bytes(34 * 512)  # a filesystem image, an empty disk
    assert "no boot signature" in str(boot_problem(blank, "bios"))
    assert "no partition table" in str(boot_problem(blank, "uefi"))


@pytest.mark.parametrize("firmware", ["auto", "uefi"])
def test_a_disk_that_cannot_boot_is_refused_before_any_guest_runs(tmp_path: Path, firmware: str) -> None:
    """An ext4 filesystem image given where a whole disk belongs: refused, with what to give instead."""
    cache = Cache(tmp_path / "cache")
    cache.ensure_writable()
    source = tmp_path / "rootfs.img"
    source.write_bytes(bytes(1024) + b"\x53\xef" * 512 + bytes(64 * 1024))  # no MBR, no GPT
    with pytest.raises(ImageError, match=r"rootfs.img.* is not a bootable disk: .*; give a cloud image's whole disk"):
        prepare(cache, ByoSpec(str(source), firmware=firmware), lambda m: None)
    assert not (cache.root / "seeds").exists() or list((cache.root / "seeds").iterdir()) == []
    assert list((cache.root / "tmp").iterdir()) == []
