"""Turn a recipe into a bootable image directory, with or without root.

Two builders make the root filesystem: mmdebstrap a full Debian system
(:mod:`.mmdebstrap`), and ``builder = "extract"`` a minimal busybox system
unpacked from packages without installing them (:mod:`.minimal`). Either
filesystem is then grown and turned into ext4 with e2fsprogs and stored as
qcow2, so guests boot from throwaway overlays on top of it. Every image gets
its own SSH client key and sshd host key (:mod:`.keys`).
"""

from __future__ import annotations

import getpass
import hashlib
import os
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..arch import ARCHES, Arch, by_name, image_arch, is_native
from ..errors import ImageError
from . import foreign, mmdebstrap
from .image import DISK_NAME, INITRD_NAME, KERNEL_NAME, BuiltImage, GuestOS
from .keys import CLIENT_KEY_NAME, HOST_KEY_NAME, public_line, write_keys
from .recipe import BUILDER_VERSION
from .tools import have_tool, run_tool

if TYPE_CHECKING:
    from .recipe import Recipe

_HOST_DEBIAN = {"x86_64": "amd64", "aarch64": "arm64", "riscv64": "riscv64"}
_MMDEBSTRAP_DISTRIBUTIONS = ("debian", "ubuntu")
# Which of the architectures this plugin runs each known release has (with a kernel); others are not checked.
_RELEASE_ARCHES = {
    ("debian", "bookworm"): frozenset(("amd64", "arm64", "i386")),
    ("debian", "trixie"): frozenset(("amd64", "arm64", "riscv64")),
}
_TOOLS = {
    "genext2fs": "genext2fs",
    "tune2fs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "resize2fs": "e2fsprogs",
    "qemu-img": "qemu-utils",
}
_BUILDER_TOOLS = {
    "mmdebstrap": {"mmdebstrap": "mmdebstrap"},
    "extract": {"apt-get": "apt", "dpkg-deb": "dpkg"},
}
# Only mmdebstrap needs user namespaces (so subordinate ids) without root.
_ROOTLESS_TOOLS = {"newuidmap": "uidmap", "newgidmap": "uidmap"}
# mmdebstrap asks arch-test whether this host can run another architecture's binaries (i386 on amd64).
_FOREIGN_TOOLS = {"arch-test": "arch-test"}
_PACKAGE_MANAGERS = {"mmdebstrap": "apt", "extract": "none"}

def _ignore(message: str) -> None:
    """Default progress sink: builds are quiet unless the caller listens."""


def build_image(recipe: Recipe, out_dir: Path, progress: Callable[[str], None] = _ignore) -> None:
    """Build ``recipe`` into the empty directory ``out_dir``.

    ``image.json`` is written last, so a directory without it is an
    interrupted build; the caller owns locking and the final rename.
    """
    started = time.monotonic()
    arch = _check_recipe(recipe)
    _check_host(recipe)
    out_dir = out_dir.resolve()
    if any(character.isspace() for character in str(out_dir)):
        # mmdebstrap splits its special hooks on whitespace.
        raise ImageError(f"cannot build in {str(out_dir)!r}: use an image directory without spaces")
    disk = out_dir / DISK_NAME
    host, has_agent = _make_disk(recipe, arch, out_dir, disk, progress)
    for name in (DISK_NAME, KERNEL_NAME, INITRD_NAME, HOST_KEY_NAME, CLIENT_KEY_NAME + ".pub"):
        (out_dir / name).chmod(0o444)
    _describe(recipe, arch, out_dir, disk, host, has_agent).save()
    progress(f"built {recipe.name} in {time.monotonic() - started:.0f} s")


def _make_disk(
    recipe: Recipe, arch: Arch, out_dir: Path, disk: Path, progress: Callable[[str], None],
) -> tuple[Ed25519PrivateKey, bool]:
    """Keys, the root filesystem, the kernel and initrd beside it, and ``disk`` in qcow2.

    Returns the host key (its public line goes into image.json) and whether the guest has an agent.
    The stage and the raw filesystem are removed whatever happens.
    """
    stage = out_dir / ".stage"
    raw = out_dir / "rootfs.ext2"
    try:
        stage.mkdir(mode=0o700)
        client_key, host = write_keys(out_dir)
        client = public_line(client_key)
        if recipe.builder == "extract":
            from .minimal import extract  # the minimal builder's modules load only when one is built

            has_agent = extract.build_root(recipe, stage, raw, host, client, progress)
        elif is_native(arch):
            archive = mmdebstrap.write_stage(recipe, stage, host, client)
            progress(f"bootstrapping {recipe.release} with mmdebstrap")
            mmdebstrap.run(recipe, mmdebstrap.native_command(recipe, archive, raw), progress)
        else:  # finishes the filesystem itself: its second stage installs into the grown ext4
            _build_foreign(recipe, arch, stage, raw, host, client, progress)
        if recipe.builder != "extract":
            has_agent = (stage / "facts").read_text(encoding="ascii").strip() == "agent=1"
        for name in (KERNEL_NAME, INITRD_NAME):
            os.replace(stage / name, out_dir / name)
        if recipe.builder == "extract" or is_native(arch):
            progress(f"making ext4 of {recipe.disk_size}")
            finish_filesystem(raw, recipe.disk_size_bytes)
        progress(f"converting to {DISK_NAME}")
        run_tool(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(disk)])
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        raw.unlink(missing_ok=True)
    return host, has_agent


def _describe(
    recipe: Recipe, arch: Arch, out_dir: Path, disk: Path, host: Ed25519PrivateKey, has_agent: bool,
) -> BuiltImage:
    """What image.json says of the image just built (its disk's digest read here)."""
    with disk.open("rb") as handle:
        disk_sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
    return BuiltImage(
        directory=out_dir,
        name=recipe.name,
        recipe_digest=recipe.digest,
        disk=disk,
        disk_sha256=disk_sha256,
        kernel=out_dir / KERNEL_NAME,
        initrd=out_dir / INITRD_NAME,
        cmdline=recipe.kernel_cmdline,
        user=recipe.user,
        client_key=out_dir / CLIENT_KEY_NAME,
        host_key=public_line(host),
        arch=image_arch(recipe.architecture),
        os=GuestOS(
            id=recipe.distribution,
            version=recipe.version,
            init=recipe.init,
            package_manager=_PACKAGE_MANAGERS[recipe.builder],
            arch=arch.uname,
        ),
        agent=has_agent,
        built_at=time.time(),
        builder_version=BUILDER_VERSION,
    )


def _build_foreign(
    recipe: Recipe, arch: Arch, stage: Path, raw: Path, host: Ed25519PrivateKey, client: str,
    progress: Callable[[str], None],
) -> None:
    """Unpack on the host, install under emulation (see :mod:`.foreign`); leaves kernel, initrd and facts in ``stage``."""
    work = stage / "foreign"
    (work / "host").mkdir(parents=True)
    archive = mmdebstrap.write_stage(recipe, stage, host, client,
                                     extra={foreign.STAGE2_NAME: (foreign.stage2_script(recipe), 0o755)})
    progress(f"unpacking {recipe.release} for {recipe.architecture} with mmdebstrap (first stage)")
    mmdebstrap.run(recipe, foreign.extract_command(recipe, archive, raw, work / "host"), progress)
    progress(f"making ext4 of {recipe.disk_size}")
    finish_filesystem(raw, recipe.disk_size_bytes)
    results = foreign.run_stage2(recipe, arch, arch.qemu_binary, work, raw, progress)
    foreign.check_filesystem(raw)
    foreign.copy_results(work, results, stage)


def _check_recipe(recipe: Recipe) -> Arch:
    """Refuse what this builder cannot make before spending a minute on it."""
    if recipe.builder == "mmdebstrap" and recipe.distribution not in _MMDEBSTRAP_DISTRIBUTIONS:
        raise ImageError(
            f"image {recipe.name!r}: cannot build distribution {recipe.distribution!r}; "
            f"use one of {', '.join(_MMDEBSTRAP_DISTRIBUTIONS)}"
        )
    try:
        arch = by_name(recipe.architecture)
    except KeyError:
        raise ImageError(
            f"image {recipe.name!r}: unsupported architecture {recipe.architecture!r}; use one of {', '.join(ARCHES)}"
        ) from None
    have = _RELEASE_ARCHES.get((recipe.distribution, recipe.release))
    if have is not None and recipe.architecture not in have:
        raise ImageError(
            f"image {recipe.name!r}: {recipe.distribution} {recipe.release} has no {recipe.architecture} "
            f"release; it has {', '.join(sorted(have))} (of those this plugin runs)"
        )
    if recipe.builder == "extract" and not is_native(arch):
        raise ImageError(f"image {recipe.name!r}: builder 'extract' runs the guest's busybox on the host, "
                         f"so it cannot build {recipe.architecture} here; use the default builder")
    return arch


def host_tools(recipe: Recipe, rootless: bool = True) -> dict[str, str]:
    """Every host program building ``recipe`` runs, and the Debian package that has it."""
    tools = {**_BUILDER_TOOLS[recipe.builder], **_TOOLS}
    if recipe.builder == "mmdebstrap":
        if rootless:
            tools.update(_ROOTLESS_TOOLS)
        arch = ARCHES.get(recipe.architecture)
        if arch is not None and not is_native(arch):
            # Unpacked on the host, installed under emulation: the emulator, not arch-test.
            tools[arch.qemu_binary] = arch.qemu_package
        elif recipe.architecture != _HOST_DEBIAN.get(platform.machine()):
            tools.update(_FOREIGN_TOOLS)
    return tools


def _check_host(recipe: Recipe) -> None:
    """Name the missing package or subordinate-id entry up front.

    Without these mmdebstrap fails deep inside with a message that does not
    say what to install or configure.
    """
    rootless = os.geteuid() != 0 and recipe.builder == "mmdebstrap"
    for tool, package in host_tools(recipe, rootless).items():
        if not have_tool(tool):
            raise ImageError(f"building images needs {tool}: install the {package} package")
    if rootless:
        mmdebstrap.check_subordinate_ids(getpass.getuser(), os.getuid())


def finish_filesystem(raw: Path, size: int) -> None:
    """Turn mmdebstrap's nearly full ext2 into an ext4 of the recipe's size.

    The journal makes a guest killed mid-test leave a consistent disk in its
    overlay; extents speed up files written during tests.
    """
    run_tool(["tune2fs", "-O", "extents,uninit_bg,dir_index,has_journal", str(raw)])
    # Exit status 1 means "fixed something", which tune2fs's changes require.
    run_tool(["e2fsck", "-f", "-y", str(raw)], ok=(0, 1))
    if raw.stat().st_size > size:
        raise ImageError(
            f"the root filesystem needs {raw.stat().st_size >> 20} MiB, more than disk_size: "
            "raise disk_size in the recipe"
        )
    run_tool(["resize2fs", str(raw), f"{size // 1024}K"])


