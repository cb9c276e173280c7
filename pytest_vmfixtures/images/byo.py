"""Bring your own image: any cloud image with cloud-init, from a local path or a URL.

``@pytest.mark.vm(image="https://.../x.qcow2", sha256="...")`` boots a vendor's
cloud image (Debian, Ubuntu, Fedora, ...) the way a cloud does:

* **The disk** is downloaded once into ``cache/downloads/<sha256>/``, its digest
  checked while it streams (a mismatch is an ``ImageError`` and nothing is
  kept) and again on first use in every run. A local path is copied there,
  hashed on the way, and guests boot the copy (each writes only to its own
  overlay); ``sha256`` is required for URLs and optional for paths. A qcow2
  with a backing file or an external data file is refused: it could make QEMU read any host file.
* **A NoCloud seed** (an ISO 9660 volume labelled ``cidata``, written here with
  pycdlib) tells cloud-init the host name, creates the login user ``vmfix``
  with password-less sudo (or uses ``root`` when ``user="root"``), authorises a
  client key generated for this image, installs an sshd host key generated
  here too (so the client pins it), and turns password logins off. The keys
  and the seed live in ``cache/seeds/``, one set per (image digest, user).
  ``vm.run`` runs commands as root either way (through ``sudo -n`` when the
  login user is not root).
* **Firmware**: no ``-kernel``; the disk's own bootloader starts under SeaBIOS
  ("bios") or OVMF ("uefi"). ``firmware="auto"`` (the default) reads the
  partition table: a GPT with an EFI system partition and no BIOS boot
  partition is "uefi"; everything else, hybrid images included, is "bios".
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..channels import runner
from ..errors import ImageError
from .cache import Cache, sha256_file
from .fetch import CHUNK, download
from .image import BuiltImage, GuestOS
from .keys import CLIENT_KEY_NAME, HOST_KEY_NAME, private_bytes, public_line, write_keys

BYO_SUFFIXES = (".qcow2", ".img", ".raw")
URL_PREFIXES = ("http://", "https://")
DEFAULT_USER = "vmfix"
FIRMWARES = ("auto", "uefi", "bios")
SEED_VERSION = "2"  # 2: the seed installs and starts vmfx-runner
SEED_NAME = "seed.iso"

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_LABEL_RE = re.compile(r"[^A-Za-z0-9.-]+")

# GPT partition type GUIDs (as text; the on-disk form is mixed-endian).
ESP_GUID = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
BIOS_BOOT_GUIDS = frozenset((
    "21686148-6449-6e6f-744e-656564454649",  # GRUB's BIOS boot partition
    "83bd6b9d-7f41-11dc-be0b-001560b84f0f",  # FreeBSD's freebsd-boot
))

Progress = Callable[[str], None]


def is_url(image: str) -> bool:
    return image.startswith(URL_PREFIXES)


def is_byo(image: str) -> bool:
    """A path or URL of a disk image rather than the name of a recipe."""
    return is_url(image) or "/" in image or image.endswith(BYO_SUFFIXES)


def check_spec(image: str, sha256: object, user: object, firmware: object) -> str | None:
    """The complaint about a bring-your-own image's arguments, or None."""
    byo = is_byo(image)
    if not byo:
        given = [k for k, v in (("sha256", sha256), ("user", user), ("firmware", firmware)) if v is not None]
        if given:
            return f"{given[0]}= applies only to your own image (a path or http(s) URL), not to {image!r}"
        return None
    if sha256 is None:
        if is_url(image):
            return f"image {image!r} is a URL: give its sha256= (the download is checked against it)"
    elif not isinstance(sha256, str) or not _SHA256_RE.match(sha256.lower()):
        return f"sha256 must be 64 hex digits, got {sha256!r}"
    if user is not None and (not isinstance(user, str) or not _USER_RE.match(user)):
        return f"user must be a user name such as {DEFAULT_USER!r} or 'root', got {user!r}"
    if firmware is not None and firmware not in FIRMWARES:
        return f"firmware={firmware!r} is not one of {', '.join(FIRMWARES)}"
    return None


def label_for(image: str, sha256: str | None = None) -> str:
    """A short name for files and guests: the file's stem, safe for paths and host names."""
    stem = urllib.parse.urlsplit(image).path.rsplit("/", 1)[-1] if is_url(image) else Path(image).name
    for suffix in BYO_SUFFIXES:
        stem = stem.removesuffix(suffix)
    stem = _LABEL_RE.sub("-", stem).strip("-.")[:40] or "image"
    return f"{stem}-{sha256[:8]}" if sha256 else stem


def hostname_for(sha256: str) -> str:
    """The host name the seed gives guests of the image with this digest."""
    return f"vmfix-{sha256[:12]}"


@dataclass(frozen=True)
class ByoSpec:
    source: str
    sha256: str | None = None
    user: str = DEFAULT_USER
    firmware: str = "auto"


# -- the disk ------------------------------------------------------------------
def cached_download(cache: Cache, url: str, sha256: str, progress: Progress) -> Path:
    """The verified file for ``url``: downloaded once across processes, re-checked on first use per run."""
    sha256 = sha256.lower()
    name = label_for(url) + Path(urllib.parse.urlsplit(url).path).suffix

    def create(directory: Path) -> None:
        download(url, sha256, directory / name, progress)
        (directory / name).chmod(0o444)
        # The digest is known from the download: no second pass over a large file.
        meta = {"kind": "download", "url": url, "files": {name: sha256}, "created": time.time()}
        (directory / "manifest.json").write_text(json.dumps(meta, indent=1, sort_keys=True))

    (cache.root / "downloads").mkdir(parents=True, exist_ok=True)
    directory = cache.entry(
        "downloads", sha256, create, functools.partial(_check_disk_entry, sha256),
        waiting=lambda: progress(f"waiting for another run downloading {url}"),
    )
    return _disk_in(directory)


def imported_copy(cache: Cache, source: Path, sha256: str | None, progress: Progress) -> tuple[Path, str]:
    """A private read-only copy of the user's local disk, and its digest.

    QEMU opens the disk long after it was checked, and every guest reads it
    again: a file the user (or anyone who can write it) may still change.
    So the bytes hashed are the bytes stored, in the cache under their digest
    (the same entry a download of that digest makes), and guests boot the copy.
    Without ``sha256=`` the file is hashed first to find the entry; a copy
    whose bytes differ from that digest (the file changed meanwhile) is refused.
    """
    expected = sha256.lower() if sha256 is not None else sha256_file(source)

    def create(directory: Path) -> None:
        name = "disk" + (source.suffix if source.suffix in BYO_SUFFIXES else ".img")
        progress(f"copying {source} into the cache ({source.stat().st_size / 2**20:.0f} MiB)")
        digest = hashlib.sha256()
        with source.open("rb") as reader, (directory / name).open("xb") as writer:
            while chunk := reader.read(CHUNK):
                digest.update(chunk)
                writer.write(chunk)
        if digest.hexdigest() != expected:
            what = "the expected" if sha256 is not None else "the digest it had moments ago,"
            raise ImageError(f"{source} has sha256 {digest.hexdigest()}, not {what} {expected}: "
                             "fix sha256= or stop whatever writes the file")
        (directory / name).chmod(0o444)
        meta = {"kind": "copy", "source": str(source), "files": {name: expected}, "created": time.time()}
        (directory / "manifest.json").write_text(json.dumps(meta, indent=1, sort_keys=True))

    (cache.root / "downloads").mkdir(parents=True, exist_ok=True)
    directory = cache.entry("downloads", expected, create, functools.partial(_check_disk_entry, expected),
                            waiting=lambda: progress(f"waiting for another run copying {source}"))
    return _disk_in(directory), expected


def _check_disk_entry(sha256: str, directory: Path) -> str | None:
    """A downloads entry holds one disk of the digest it is named by (fetched by URL or copied from a file)."""
    problem = Cache.check_manifest(directory)
    if problem is None and list(_manifest_files(directory).values()) != [sha256]:
        return "manifest does not name one file of the expected digest"
    return problem


def _manifest_files(directory: Path) -> dict[str, str]:
    files = Cache.read_manifest(directory).get("files")
    return {str(name): str(digest) for name, digest in files.items()} if isinstance(files, dict) else {}


def _disk_in(directory: Path) -> Path:
    """The entry's disk; using it marks the entry most recently used, for whoever prunes the cache."""
    with contextlib.suppress(OSError):
        os.utime(directory)
    return directory / next(iter(_manifest_files(directory)))


def disk_info(disk: Path, qemu_img: str = "qemu-img") -> str:
    """The disk's format ("qcow2" or "raw"); refuses a qcow2 with a backing file or an external data file
    (either makes QEMU read a host file the image names)."""
    result = subprocess.run(
        [qemu_img, "info", "--output=json", str(disk)], capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise ImageError(f"qemu-img cannot read {disk}: {result.stderr.strip()}")
    info = json.loads(result.stdout)
    fmt = str(info.get("format", ""))
    if fmt not in ("qcow2", "raw"):
        raise ImageError(f"{disk} is a {fmt or 'unknown'} image; convert it to qcow2 (qemu-img convert -O qcow2)")
    if info.get("backing-filename"):
        raise ImageError(f"{disk} has a backing file ({info['backing-filename']}); flatten it: qemu-img convert -O qcow2")
    specific = info.get("format-specific")
    data = specific.get("data") if isinstance(specific, dict) else None
    if isinstance(data, dict) and data.get("data-file"):  # its clusters live in a host file it names
        raise ImageError(f"{disk} keeps its data in an external file ({data['data-file']}); make it self-contained: "
                         "qemu-img convert -O qcow2")
    return fmt


def read_head(disk: Path, fmt: str, size: int, scratch: Path, qemu_img: str = "qemu-img") -> bytes:
    """The first ``size`` bytes of the disk as the guest sees it."""
    if fmt == "raw":
        with open(disk, "rb") as f:
            return f.read(size)
    out = scratch / f"head-{uuid.uuid4().hex[:8]}"
    try:
        result = subprocess.run(
            [qemu_img, "dd", "-f", fmt, "-O", "raw", "bs=512", f"count={size // 512}", f"if={disk}", f"of={out}"],
            capture_output=True, text=True, timeout=60, check=False,
        )
        if result.returncode != 0:
            raise ImageError(f"qemu-img cannot read {disk}: {result.stderr.strip()}")
        return out.read_bytes()
    finally:
        out.unlink(missing_ok=True)


def _guid(raw: bytes) -> str:
    return str(uuid.UUID(bytes_le=raw))


def boot_problem(head: bytes, firmware: str) -> str | None:
    """Why the disk cannot boot with ``firmware``, seen from its first sectors, or None.

    A BIOS boots only a disk with a boot sector (the 0x55AA signature); UEFI needs a partition
    table (GPT, or an MBR) to find its EFI system partition. A filesystem image, an empty disk
    or some other file has neither.
    """
    signed = len(head) >= 512 and head[510:512] == b"\x55\xaa"
    gpt = len(head) >= 520 and head[512:520] == b"EFI PART"
    if firmware == "bios" and not signed:
        return "its first sector has no boot signature, so the BIOS cannot boot it"
    if firmware == "uefi" and not (gpt or signed):
        return "it has no partition table, so the UEFI firmware finds no EFI system partition on it"
    return None


def detect_firmware(head: bytes) -> str:
    """ "uefi" for a GPT with an EFI system partition and no BIOS boot partition, else "bios".

    ``head`` holds at least the first 34 sectors (512-byte sectors assumed).
    """
    if len(head) < 1024 or head[512:520] != b"EFI PART":
        if len(head) >= 512 and head[510:512] == b"\x55\xaa":  # MBR: an ESP (type 0xef) and nothing bootable else
            kinds = [head[446 + 16 * i + 4] for i in range(4)]
            if 0xEF in kinds and not any(t in (0x83, 0x07, 0x0B, 0x0C, 0xA5) for t in kinds):
                return "uefi"
        return "bios"
    start = int.from_bytes(head[512 + 72 : 512 + 80], "little")
    count = int.from_bytes(head[512 + 80 : 512 + 84], "little")
    entry_size = int.from_bytes(head[512 + 84 : 512 + 88], "little")
    types: set[str] = set()
    for index in range(min(count, 128)):
        offset = start * 512 + index * entry_size
        raw = head[offset : offset + 16]
        if len(raw) < 16:
            break
        if any(raw):
            types.add(_guid(raw))
    if ESP_GUID in types and not types & BIOS_BOOT_GUIDS:
        return "uefi"
    return "bios"


# -- the seed ------------------------------------------------------------------
def user_data(user: str, client_public: str, host_private: str, host_public: str) -> str:
    """``#cloud-config`` (as JSON, which YAML reads): login user, keys, no passwords; vmfx-runner."""
    config: dict[str, object] = {
        # root's authorized_keys get the key too, unrestricted; the login user is ours.
        "disable_root": False,
        "ssh_authorized_keys": [client_public],
        "ssh_pwauth": False,
        "ssh_deletekeys": True,
        "ssh_genkeytypes": [],
        "ssh_keys": {"ed25519_private": host_private, "ed25519_public": host_public},
        "users": [] if user == "root" else [{
            "name": user,
            "gecos": "pytest-vmfixtures",
            "shell": "/bin/sh",
            "sudo": "ALL=(ALL) NOPASSWD:ALL",
            "lock_passwd": True,
            "ssh_authorized_keys": [client_public],
        }],
        **runner.cloud_config(),
    }
    return "#cloud-config\n" + json.dumps(config, indent=1) + "\n"


def meta_data(instance_id: str, hostname: str) -> str:
    return f"instance-id: {instance_id}\nlocal-hostname: {hostname}\n"


def write_seed_iso(path: Path, meta: str, user: str) -> None:
    """An ISO 9660 volume labelled ``cidata`` with ``meta-data`` and ``user-data`` (Rock Ridge and Joliet names)."""
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for iso_name, name, text in (("/METADATA.;1", "meta-data", meta), ("/USERDATA.;1", "user-data", user)):
        data = text.encode("utf-8")
        iso.add_fp(io.BytesIO(data), len(data), iso_name, rr_name=name, joliet_path=f"/{name}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # it holds the host's private key
    with os.fdopen(fd, "wb") as out:
        iso.write_fp(out)
    iso.close()


def make_seed(directory: Path, sha256: str, user: str) -> None:
    """Keys and the seed ISO for guests of one image as one user."""
    client, host = write_keys(directory)
    write_seed_iso(
        directory / SEED_NAME,
        meta_data(f"vmfix-{sha256[:16]}", hostname_for(sha256)),
        user_data(user, public_line(client), private_bytes(host).decode("ascii"), public_line(host)),
    )


# -- putting it together ---------------------------------------------------------
def prepare(cache: Cache, spec: ByoSpec, progress: Progress, qemu_img: str = "qemu-img") -> BuiltImage:
    """A bootable description of the user's image: disk verified, seed and keys made once."""
    started = time.monotonic()
    disk, sha256 = _verified_disk(cache, spec, progress)
    fmt = disk_info(disk, qemu_img)
    firmware = _bootable_firmware(cache, spec, disk, fmt, qemu_img)
    seeds = _seed_entry(cache, sha256, spec.user)
    progress(f"image {label_for(spec.source, sha256)}: {fmt}, firmware {firmware}, ready in {time.monotonic() - started:.1f} s")
    return _describe(spec, disk, sha256, fmt, firmware, seeds)


def _verified_disk(cache: Cache, spec: ByoSpec, progress: Progress) -> tuple[Path, str]:
    """The user's disk in the cache (downloaded, or copied in) and its sha256, checked against the one given."""
    if is_url(spec.source):
        if spec.sha256 is None:
            raise ImageError(f"image {spec.source!r} is a URL: give its sha256=")
        sha256 = spec.sha256.lower()
        return cached_download(cache, spec.source, sha256, progress), sha256
    source = Path(spec.source).expanduser().resolve()
    if not source.is_file():
        raise ImageError(f"image {spec.source!r}: no such file")
    return imported_copy(cache, source, spec.sha256, progress)


def _bootable_firmware(cache: Cache, spec: ByoSpec, disk: Path, fmt: str, qemu_img: str) -> str:
    """The firmware the disk boots with (given, or found in its first sectors), or an ImageError if it cannot."""
    scratch = cache.new_tmp("probe")
    try:
        head = read_head(disk, fmt, 34 * 512, scratch, qemu_img)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    firmware = detect_firmware(head) if spec.firmware == "auto" else spec.firmware
    problem = boot_problem(head, firmware)
    if problem is not None:
        raise ImageError(f"image {spec.source!r} is not a bootable disk: {problem}; give a cloud image's whole "
                         "disk (qcow2 or raw, with its partition table and bootloader), not a filesystem or an ISO")
    return firmware


def _seed_entry(cache: Cache, sha256: str, user: str) -> Path:
    """The cache entry with the keys and seed ISO for guests of this disk as ``user``, made once, marked used now."""

    def create(directory: Path) -> None:
        make_seed(directory, sha256, user)
        cache.write_manifest(
            directory,
            {"kind": "seed", "image_sha256": sha256, "user": user},
            [CLIENT_KEY_NAME, CLIENT_KEY_NAME + ".pub", HOST_KEY_NAME, SEED_NAME],
        )

    (cache.root / "seeds").mkdir(parents=True, exist_ok=True)
    seeds = cache.entry("seeds", f"{sha256[:32]}-{user}-{SEED_VERSION}", create, cache.check_manifest)
    with contextlib.suppress(OSError):
        os.utime(seeds)  # most recently used, for whoever prunes the cache
    return seeds


def _describe(spec: ByoSpec, disk: Path, sha256: str, fmt: str, firmware: str, seeds: Path) -> BuiltImage:
    """The image as guests see it; its identity (``recipe_digest``) is the disk, the seed and what guests get."""
    seed_digest = _manifest_files(seeds).get(SEED_NAME, "")
    return BuiltImage(
        directory=seeds,
        name=label_for(spec.source, sha256),
        # The seed holds the keys: a new seed is a new guest, so it is part of the identity.
        # Guests get the agent's channel and vmfx-runner's port; whether an agent or the runner answers, and
        # whether root logs in with the key, is learned on the first boot and kept with the state, which is
        # saved with lingering users (instance.settle_first_boot): states made before any of that are not used.
        recipe_digest=hashlib.sha256(
            f"{sha256}|{seed_digest}|{firmware}|agent|root-login|linger|runner".encode()).hexdigest(),
        disk=disk,
        disk_sha256=sha256,
        kernel=None,
        initrd=None,
        cmdline="",
        user=spec.user,
        client_key=seeds / CLIENT_KEY_NAME,
        host_key=(seeds / HOST_KEY_NAME).read_text().strip(),
        arch="x86_64",
        os=GuestOS(id="unknown", version="", init="unknown", package_manager="unknown"),
        agent=True,
        built_at=time.time(),
        builder_version=f"byo-{SEED_VERSION}",
        firmware=firmware,
        seed=seeds / SEED_NAME,
        disk_format=fmt,
    )
