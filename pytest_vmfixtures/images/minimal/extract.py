"""Build a minimal guest by unpacking Debian packages instead of installing them.

The result is in the spirit of CirrOS and boots in seconds even under
emulation: a small initramfs loads the virtio drivers and switches to an ext4
root on /dev/vda, where busybox init brings the network up with udhcpc and
starts dropbear. No package manager and no maintainer script ever runs, so
nothing needs root, user namespaces or a chroot: apt-get only downloads, into
a private directory tree; dpkg-deb only unpacks; both filesystems are written
from archives whose members belong to root (see :mod:`pytest_vmfixtures.images.minimal.fstree`).

The root holds every file of the recipe's packages except documentation, the
shared libraries those programs load (read from their ELF headers and looked
up in every downloaded package) and the system files of
:mod:`pytest_vmfixtures.images.minimal.system`. The kernel and its modules come from
whichever downloaded package ships ``/boot/vmlinuz-*``.
"""

from __future__ import annotations

import gzip
import lzma
import os
import posixpath
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ...errors import ImageError
from ..image import INITRD_NAME, KERNEL_NAME
from ..tools import run_tool
from . import system
from .elf import is_elf, modinfo, read_elf
from .fstree import Tree, usr_path

if TYPE_CHECKING:
    from ..recipe import Recipe

# Drivers for the devices the plugin gives every guest (disk, NIC, entropy,
# agent port); what they depend on is read from their .modinfo.
GUEST_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "virtio_rng", "virtio_console")
_SKIPPED = ("usr/share/doc/", "usr/share/man/", "usr/share/info/", "usr/share/lintian/", "usr/share/locale/")
_KERNEL_PARTS = ("boot/", "lib/modules/", "usr/lib/modules/")
_LIBRARY_DIRS = ("lib", "usr/lib", "lib64", "usr/lib64", "lib32", "usr/lib32")
_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz")
# Applets left out: busybox's dpkg and rpm would make a system without a
# package database look like it has a package manager; linuxrc is for initrds.
_NO_APPLETS = frozenset(("dpkg", "dpkg-deb", "rpm", "rpm2cpio", "linuxrc"))
_KEYRINGS = (Path("/usr/share/keyrings/debian-archive-keyring.gpg"),)
_HOST_TRUSTED = Path("/etc/apt/trusted.gpg.d")


@dataclass(frozen=True)
class Unpacked:
    """The downloaded packages, each unpacked into its own directory."""

    packages: dict[str, Path]

    def find(self, path: str) -> tuple[Path, str] | None:
        """The first package holding ``path`` (as shipped, or under /usr) and the path in it."""
        relative = path.lstrip("/")
        for directory in self.packages.values():
            for candidate in (relative, usr_path(relative)):
                if os.path.lexists(directory / candidate):
                    return directory, candidate
        return None


@dataclass(frozen=True)
class Result:
    """What the image directory and its manifest need from an extract build."""

    kernel: bytes
    initrd: bytes
    has_agent: bool


def build(
    recipe: Recipe,
    work: Path,
    root_tar: Path,
    host_key: Ed25519PrivateKey,
    client_key: str,
    progress: Callable[[str], None],
) -> Result:
    """Download and unpack ``recipe``'s packages; write its root filesystem as the tar ``root_tar``.

    ``client_key`` is the public line that may log in as the recipe's user.
    """
    debs = download(recipe, work / "apt", progress)
    progress(f"unpacking {len(debs)} packages")
    unpacked = unpack(debs, work / "unpacked")
    version, kernel_dir = _find_kernel(unpacked)
    tree = Tree(mtime=_newest_mtime(unpacked))
    progress("assembling the root filesystem")
    for name in recipe.packages:
        if name not in unpacked.packages:
            raise ImageError(f"image {recipe.name!r}: apt did not download {name}; check the package name")
        copy_package(tree, unpacked.packages[name])
    busybox = unpacked.find("bin/busybox")
    if busybox is None or "usr/sbin/dropbear" not in tree:
        raise ImageError(f"image {recipe.name!r} needs busybox and dropbear: add busybox-static and dropbear-bin")
    _link_applets(tree, busybox[0] / busybox[1])
    add_libraries(tree, unpacked)
    has_agent = "usr/sbin/qemu-ga" in tree
    system.write_system(tree, recipe, host_key, client_key, has_agent)
    tree.write_tar(root_tar)
    progress(f"writing the initramfs for kernel {version}")
    modules = kernel_modules(kernel_dir, version, GUEST_MODULES)
    cpio = system.initramfs((busybox[0] / busybox[1]).read_bytes(), modules, tree.mtime)
    kernel = (kernel_dir / "boot" / f"vmlinuz-{version}").read_bytes()
    return Result(kernel=kernel, initrd=gzip.compress(cpio, mtime=0), has_agent=has_agent)


def build_root(
    recipe: Recipe, stage: Path, raw: Path, host: Ed25519PrivateKey, client: str, progress: Callable[[str], None]
) -> bool:
    """The extract builder's part of a build: kernel and initrd into ``stage``, the root as the ext2 ``raw``."""
    root_tar = stage / "root.tar"
    result = build(recipe, stage / "work", root_tar, host, client, progress)
    (stage / KERNEL_NAME).write_bytes(result.kernel)
    (stage / INITRD_NAME).write_bytes(result.initrd)
    progress("writing the root filesystem with genext2fs")
    size, count = 0, 0
    with tarfile.open(root_tar) as tar:
        for member in tar:
            size += -(-member.size // 4096) * 4096
            count += 1
    # Room for the files, their directories, and the journal tune2fs adds before resize2fs grows it.
    blocks = (size * 5 // 4) // 4096 + count // 16 + 16384
    # Inodes for a filled disk, as mke2fs would give it: resize2fs adds only blocks per inode group.
    inodes = max(count * 2, recipe.disk_size_bytes // 16384)
    run_tool(["genext2fs", "-B", "4096", "-b", str(blocks), "-N", str(inodes), "-a", str(root_tar), str(raw)])
    shutil.rmtree(stage / "work", ignore_errors=True)
    return result.has_agent


def download(recipe: Recipe, root: Path, progress: Callable[[str], None]) -> list[Path]:
    """Resolve and download the packages with apt-get in a private tree: no root, no host state touched."""
    for directory in (
        "etc/apt/apt.conf.d", "etc/apt/preferences.d", "etc/apt/sources.list.d", "etc/apt/trusted.gpg.d",
        "var/lib/apt/lists/partial", "var/cache/apt/archives/partial", "var/lib/dpkg",
    ):
        (root / directory).mkdir(parents=True, exist_ok=True)
    (root / "var/lib/dpkg/status").write_text("", encoding="ascii")
    keyrings = [path for path in _KEYRINGS if path.is_file()]
    if _HOST_TRUSTED.is_dir():
        keyrings += sorted(p for p in _HOST_TRUSTED.iterdir() if p.suffix in (".gpg", ".asc"))
    if not keyrings:
        raise ImageError("no archive keyring to check Debian's packages with: install debian-archive-keyring")
    for index, keyring in enumerate(keyrings):
        (root / "etc/apt/trusted.gpg.d" / f"{index:02d}-{keyring.name}").symlink_to(keyring)
    sources = [f"deb {recipe.mirror} {recipe.release} main", *recipe.extra_sources]
    (root / "etc/apt/sources.list").write_text("\n".join(sources) + "\n", encoding="utf-8")
    options = [
        f"Dir={root}",
        f"Dir::State::status={root}/var/lib/dpkg/status",
        f"APT::Architecture={recipe.architecture}",
        f"APT::Architectures::={recipe.architecture}",
        "APT::Install-Recommends=false",
        "Acquire::Languages=none",
        "Debug::NoLocking=true",
    ]
    if os.geteuid() == 0:
        options.append("APT::Sandbox::User=root")  # the private tree is not the _apt user's to write
    apt = ["apt-get", "-q", *(f"-o{option}" for option in options)]
    progress(f"downloading package lists for {recipe.release}")
    run_tool([*apt, "update"], hint="check the recipe's mirror and extra_sources and the host's network")
    progress(f"downloading {', '.join(recipe.packages)} and what they depend on")
    run_tool([*apt, "install", "--download-only", "-y", *recipe.packages], hint="check the recipe's package names")
    return sorted((root / "var/cache/apt/archives").glob("*.deb"))


def unpack(debs: Iterable[Path], target: Path) -> Unpacked:
    packages: dict[str, Path] = {}
    for deb in debs:
        name = deb.name.split("_", 1)[0]
        directory = target / name
        directory.mkdir(parents=True)
        run_tool(["dpkg-deb", "-x", str(deb), str(directory)])
        packages[name] = directory
    return Unpacked(packages)


def copy_package(tree: Tree, directory: Path) -> None:
    """Copy one unpacked package into the tree, minus documentation and kernel files."""
    for path in sorted(directory.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue  # directories appear with the files in them
        relative = path.relative_to(directory).as_posix()
        if not relative.startswith(_SKIPPED + _KERNEL_PARTS):
            copy_path(tree, directory, relative)


def copy_path(tree: Tree, directory: Path, relative: str) -> None:
    """Copy a file or a symlink (and what it points to, in the same package), keeping its mode."""
    source = directory / relative
    destination = usr_path(relative)
    if source.is_symlink():
        _check_inside(directory, source.parent, relative)  # a directory link must not lead out either
        target = os.readlink(source)
        if target.startswith("/"):
            resolved = posixpath.normpath(target.lstrip("/"))
        else:
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(relative), target))
        if resolved == ".." or resolved.startswith("../"):
            raise ImageError(f"package file /{relative} links to {target}, outside its package: "
                             "refusing to build from a package that points into the host (check extra_sources)")
        tree.link(destination, "/" + usr_path(resolved))
        if os.path.lexists(directory / resolved) and usr_path(resolved) not in tree:
            copy_path(tree, directory, resolved)
    elif source.is_file():
        _check_inside(directory, source, relative)
        tree.file(destination, source.read_bytes(), stat.S_IMODE(source.stat().st_mode))


def _check_inside(directory: Path, path: Path, relative: str) -> None:
    """``path``, with every link on the way followed, is in the unpacked package ``directory``."""
    root = os.path.realpath(directory)
    real = os.path.realpath(path)
    if real != root and not real.startswith(root + os.sep):
        raise ImageError(f"package file /{relative} leads through a link to {real}, outside its package: "
                         "refusing to build from a package that points into the host (check extra_sources)")


def add_libraries(tree: Tree, unpacked: Unpacked) -> None:
    """Add the loader and shared libraries every program in the tree needs, transitively."""
    index = _library_index(unpacked)
    pending = [path for path, member in tree.members.items() if member.kind == "file" and is_elf(member.data)]
    done: set[str] = set()
    while pending:
        path = pending.pop()
        if path in done:
            continue
        done.add(path)
        try:
            elf = read_elf(tree.members[path].data)
        except ValueError as exc:
            raise ImageError(f"cannot read /{path} ({exc}): a package is damaged; build again") from exc
        wanted = [(name, index.get(name)) for name in elf.needed]
        if elf.interpreter is not None:
            wanted.append((elf.interpreter, unpacked.find(elf.interpreter)))
        for name, found in wanted:
            if found is None:
                raise ImageError(f"/{path} needs {name}, which no downloaded package has: add its package to packages")
            copy_path(tree, *found)
            real = tree.resolve(usr_path(found[1]))
            if real is not None:
                pending.append(real)


def kernel_modules(kernel_dir: Path, version: str, wanted: Iterable[str]) -> list[tuple[str, bytes]]:
    """The modules ``wanted`` needs, dependencies first, uncompressed; built-in ones are skipped."""
    base = next(
        (kernel_dir / p / version for p in ("lib/modules", "usr/lib/modules") if (kernel_dir / p / version).is_dir()),
        None,
    )
    if base is None:
        raise ImageError(f"kernel {version} ships no modules directory: use a Debian linux-image package")
    builtin: set[str] = set()
    if (base / "modules.builtin").is_file():
        builtin = {_module_name(line) for line in (base / "modules.builtin").read_text(encoding="utf-8").split()}
    files = {_module_name(path.name): path for path in (base / "kernel").rglob("*.ko*")}
    ordered: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str, needed_by: str) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in files:
            why = f" (needed by {needed_by})" if needed_by else ""
            raise ImageError(f"kernel {version} has no {name} module{why}: use a kernel with virtio drivers")
        data = _decompress(files[name])
        for dependency in filter(None, modinfo(data).get("depends", "").split(",")):
            visit(dependency, name)
        ordered.append((name, data))

    for name in wanted:
        visit(name, "")
    return ordered


def _module_name(path: str) -> str:
    name = posixpath.basename(path)
    for suffix in _MODULE_SUFFIXES:
        name = name.removesuffix(suffix)
    return name.replace("-", "_")


def _decompress(path: Path) -> bytes:
    """Modules as insmod takes them; Debian compresses them with xz since trixie."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    return data


def _find_kernel(unpacked: Unpacked) -> tuple[str, Path]:
    found = [
        (path.name.removeprefix("vmlinuz-"), directory)
        for directory in unpacked.packages.values()
        for path in (directory / "boot").glob("vmlinuz-*")
    ]
    if len(found) != 1:
        what = "no kernel" if not found else f"{len(found)} kernels"
        raise ImageError(f"the packages hold {what}: list exactly one linux-image package in packages")
    return found[0]


def _library_index(unpacked: Unpacked) -> dict[str, tuple[Path, str]]:
    """Shared library file name -> (package directory, path in it); the first package wins."""
    index: dict[str, tuple[Path, str]] = {}
    for directory in unpacked.packages.values():
        for parent in _LIBRARY_DIRS:
            base = directory / parent
            if base.is_dir():
                for candidate in (*base.glob("*.so*"), *base.glob("*-linux-gnu*/*.so*")):
                    index.setdefault(candidate.name, (directory, candidate.relative_to(directory).as_posix()))
    return index


def _newest_mtime(unpacked: Unpacked) -> int:
    """A timestamp for generated files that depends only on the packages, so rebuilds match."""
    times = (
        int(path.lstat().st_mtime)
        for directory in unpacked.packages.values()
        for path in directory.rglob("*")
        if path.is_file() and not path.is_symlink()  # directories got the unpacking's time
    )
    return max(times, default=0)


def _link_applets(tree: Tree, busybox: Path) -> None:
    """One symlink per busybox applet, from the list the binary itself prints."""
    try:
        listing = subprocess.run(
            [str(busybox), "--list-full"], capture_output=True, text=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ImageError(
            f"cannot run the guest's busybox to list its applets ({exc}): build this image on a host of its architecture"
        ) from exc
    for line in listing.split():
        path = usr_path(line)
        if path not in tree and posixpath.basename(path) not in _NO_APPLETS:
            tree.link(path, "/usr/bin/busybox")
