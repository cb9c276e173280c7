"""Build a minimal guest by unpacking Debian packages instead of installing them.

The result is in the spirit of CirrOS and boots in seconds even under
emulation: a small initramfs loads the virtio drivers and switches to an ext4
root on /dev/vda, where busybox init brings the network up with udhcpc and
starts dropbear. No package manager and no maintainer script ever runs, so
nothing needs root, user namespaces or a chroot: apt-get only downloads, into
a private directory tree; dpkg-deb only unpacks; both filesystems are written
from archives made here, whose members belong to root whoever builds them (a
tar for genext2fs, a cpio for the kernel).

The root holds every file of the recipe's packages except documentation, the
shared libraries those programs load (read from their ELF headers and looked
up in every downloaded package) and the few files a busybox system needs,
written here. The kernel and its modules come from whichever downloaded
package ships ``/boot/vmlinuz-*``.
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import posixpath
import stat
import struct
import subprocess
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pytest_vmfixtures.builder import public_line, run_tool
from pytest_vmfixtures.elf import is_elf, modinfo, read_elf
from pytest_vmfixtures.errors import ImageError

if TYPE_CHECKING:
    from pytest_vmfixtures.catalog import Recipe

# Drivers for the devices the plugin gives every guest (disk, NIC, entropy,
# agent port); what they depend on is read from their .modinfo.
GUEST_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "virtio_rng", "virtio_console")
# Directories merged into /usr, as in current Debian: packages may still ship
# files under /bin or /lib, and the root links those names into /usr.
_MERGED = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
_SKIPPED = ("usr/share/doc/", "usr/share/man/", "usr/share/info/", "usr/share/lintian/", "usr/share/locale/")
_KERNEL_PARTS = ("boot/", "lib/modules/", "usr/lib/modules/")
_LIBRARY_DIRS = ("lib", "usr/lib", "lib64", "usr/lib64", "lib32", "usr/lib32")
_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz")
_KEYRINGS = (Path("/usr/share/keyrings/debian-archive-keyring.gpg"),)
_HOST_TRUSTED = Path("/etc/apt/trusted.gpg.d")
DROPBEAR_HOST_KEY = "etc/dropbear/dropbear_ed25519_host_key"
AGENT_PORT_NAME = "org.qemu.guest_agent.0"

_INIT = """\
#!/bin/sh
# initramfs: load the virtio drivers, mount the root disk, hand over to its init.
# Exiting panics the kernel, which the plugin reports with the console log.
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
for module in {modules}; do
    insmod "/lib/modules/$module.ko" || echo "initramfs: cannot load $module"
done
root=/dev/vda
for arg in $(cat /proc/cmdline); do
    case "$arg" in root=*) root=${{arg#root=}} ;; esac
done
tries=0
while [ ! -b "$root" ]; do
    tries=$((tries + 1))
    [ "$tries" -le 300 ] || {{ echo "initramfs: $root did not appear"; exit 1; }}
    sleep 0.1
done
mount -t ext4 -o rw "$root" /newroot || {{ echo "initramfs: cannot mount $root"; exit 1; }}
umount /proc
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
"""

_INITTAB = """\
# busybox init: set up once, then keep sshd running (a test may kill it).
::sysinit:/etc/init.d/rcS
::respawn:/usr/sbin/dropbear -F -E -s -r /{host_key}
{agent}::ctrlaltdel:/sbin/reboot
::shutdown:/bin/sync
::shutdown:/bin/umount -a -r
"""

_RCS = """\
#!/bin/sh
# Runs once at boot, before sshd starts: filesystems, hostname, an address by DHCP.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=0620 devpts /dev/pts
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
hostname -F /etc/hostname
ip link set lo up
for path in /sys/class/net/*; do
    nic=${path##*/}
    [ "$nic" = lo ] && continue
    ip link set "$nic" up
    udhcpc -i "$nic" -s /etc/udhcpc/default.script -q -n -t 20 -T 1 >/dev/null 2>&1
    break
done
"""

# At the hook path Debian's busybox has built in: udhcpc calls it with the lease in its environment.
_UDHCPC_SCRIPT = """\
#!/bin/sh
case "$1" in
    deconfig)
        ip -4 addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound|renew)
        ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}"
        [ -n "$router" ] && route add default gw "${router%% *}" dev "$interface" 2>/dev/null
        : > /etc/resolv.conf
        for server in $dns; do echo "nameserver $server" >> /etc/resolv.conf; done
        ;;
esac
exit 0
"""

# Without udev the agent's port has no /dev/virtio-ports/ name: find it by name in sysfs.
_AGENT_START = f"""\
#!/bin/sh
for port in /sys/class/virtio-ports/*; do
    if [ "$(cat "$port/name" 2>/dev/null)" = {AGENT_PORT_NAME} ]; then
        exec /usr/sbin/qemu-ga -m virtio-serial -p "/dev/${{port##*/}}"
    fi
done
sleep 60
"""


@dataclass
class _Member:
    kind: str  # "dir", "file", "link" or "char"
    mode: int
    data: bytes = b""
    target: str = ""
    uid: int = 0
    gid: int = 0
    device: tuple[int, int] = (0, 0)


class Tree:
    """A filesystem built in memory, written out as a tar or a cpio with any owners."""

    def __init__(self, mtime: int) -> None:
        self.mtime = mtime
        self.members: dict[str, _Member] = {}

    def _parents(self, path: str) -> None:
        parent = posixpath.dirname(path)
        if parent and parent not in self.members:
            self.directory(parent)

    def directory(self, path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        self._parents(path)
        existing = self.members.get(path)
        if existing is None or existing.kind != "dir":
            self.members[path] = _Member("dir", mode, uid=uid, gid=gid)
        else:
            existing.mode, existing.uid, existing.gid = mode, uid, gid

    def file(self, path: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
        self._parents(path)
        self.members[path] = _Member("file", mode, data=data, uid=uid, gid=gid)

    def link(self, path: str, target: str) -> None:
        self._parents(path)
        self.members[path] = _Member("link", 0o777, target=target)

    def char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._parents(path)
        self.members[path] = _Member("char", mode, device=(major, minor))

    def write_tar(self, target: Path) -> None:
        kinds = {"dir": tarfile.DIRTYPE, "file": tarfile.REGTYPE, "link": tarfile.SYMTYPE, "char": tarfile.CHRTYPE}
        with tarfile.open(target, "w", format=tarfile.GNU_FORMAT) as tar:
            for path, member in sorted(self.members.items()):
                info = tarfile.TarInfo(path)
                info.type, info.mode, info.mtime = kinds[member.kind], member.mode, self.mtime
                info.uid, info.gid = member.uid, member.gid
                info.uname, info.gname = ("root", "root") if member.uid == 0 else ("", "")
                info.linkname = member.target
                info.devmajor, info.devminor = member.device
                if member.kind == "file":
                    info.size = len(member.data)
                    tar.addfile(info, io.BytesIO(member.data))
                else:
                    tar.addfile(info)

    def cpio(self) -> bytes:
        """The tree as a "newc" cpio archive, the format the kernel unpacks into its initramfs."""
        kinds = {"dir": stat.S_IFDIR, "file": stat.S_IFREG, "link": stat.S_IFLNK, "char": stat.S_IFCHR}
        out = bytearray()
        entries = [(path, member) for path, member in sorted(self.members.items())]
        for inode, (path, member) in enumerate(entries, start=1):
            body = member.target.encode() if member.kind == "link" else member.data
            fields = (
                inode, kinds[member.kind] | member.mode, member.uid, member.gid, 2 if member.kind == "dir" else 1,
                self.mtime, len(body), 0, 0, member.device[0], member.device[1], len(path) + 1, 0,
            )
            _cpio_entry(out, fields, path, body)
        _cpio_entry(out, (0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, len("TRAILER!!!") + 1, 0), "TRAILER!!!", b"")
        return bytes(out)


def _cpio_entry(out: bytearray, fields: tuple[int, ...], name: str, body: bytes) -> None:
    out += b"070701" + b"".join(b"%08X" % value for value in fields) + name.encode() + b"\0"
    out += b"\0" * (-len(out) % 4)
    out += body
    out += b"\0" * (-len(out) % 4)


def usr_path(path: str) -> str:
    """Where a packaged path lives in a merged-/usr root: ``lib/x`` is ``usr/lib/x``."""
    path = posixpath.normpath(path.lstrip("/"))
    return f"usr/{path}" if path.split("/", 1)[0] in _MERGED else path


@dataclass(frozen=True)
class Unpacked:
    """The downloaded packages, each unpacked into its own directory."""

    packages: dict[str, Path]

    def find(self, relative: str) -> Path | None:
        """The first package directory holding ``relative`` (as shipped, or under /usr)."""
        relative = relative.lstrip("/")
        for directory in self.packages.values():
            for candidate in (relative, usr_path(relative)):
                if os.path.lexists(directory / candidate):
                    return directory
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
    """Download and unpack ``recipe``'s packages, write its root filesystem as the tar ``root_tar``.

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
    _require(tree, "usr/bin/busybox", recipe, "busybox-static")
    _require(tree, "usr/sbin/dropbear", recipe, "dropbear-bin")
    _link_applets(tree, unpacked)
    _require(tree, "usr/sbin/init", recipe, "busybox-static")
    add_libraries(tree, unpacked)
    has_agent = "usr/sbin/qemu-ga" in tree.members
    _write_system(tree, recipe, host_key, client_key, has_agent)
    tree.write_tar(root_tar)
    progress(f"writing the initramfs for kernel {version}")
    initramfs = Tree(mtime=tree.mtime)
    busybox = unpacked.find("bin/busybox")
    assert busybox is not None  # _require found it
    initramfs.file("bin/busybox", (busybox / _existing(busybox, "bin/busybox")).read_bytes(), 0o755)
    for applet in ("sh", "mount", "umount", "insmod", "sleep", "switch_root", "cat", "echo"):
        initramfs.link(f"bin/{applet}", "busybox")
    for directory in ("dev", "proc", "sys", "newroot"):
        initramfs.directory(directory)
    initramfs.char_device("dev/console", 5, 1)
    modules = kernel_modules(kernel_dir, version, GUEST_MODULES)
    for name, data in modules:
        initramfs.file(f"lib/modules/{name}.ko", data)
    initramfs.file("init", _INIT.format(modules=" ".join(name for name, _ in modules)).encode(), 0o755)
    kernel = (kernel_dir / "boot" / f"vmlinuz-{version}").read_bytes()
    return Result(kernel=kernel, initrd=gzip.compress(initramfs.cpio(), mtime=0), has_agent=has_agent)


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
    run_tool([*apt, "install", "--download-only", "-y", *recipe.packages], hint="check the package names in the recipe")
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
        relative = path.relative_to(directory).as_posix()
        if path.is_dir() and not path.is_symlink():
            relative += "/"
        if relative.startswith(_SKIPPED) or relative.startswith(_KERNEL_PARTS):
            continue
        if relative.endswith("/"):
            continue  # directories appear with the files in them
        copy_path(tree, directory, relative)


def copy_path(tree: Tree, directory: Path, relative: str) -> None:
    """Copy a file or a symlink (and what it points to, in the same package), keeping its mode."""
    source = directory / relative
    destination = usr_path(relative)
    if source.is_symlink():
        target = os.readlink(source)
        resolved = posixpath.normpath(
            target.lstrip("/") if target.startswith("/") else posixpath.join(posixpath.dirname(relative), target)
        )
        tree.link(destination, "/" + usr_path(resolved))
        if os.path.lexists(directory / resolved) and usr_path(resolved) not in tree.members:
            copy_path(tree, directory, resolved)
    elif source.is_file():
        tree.file(destination, source.read_bytes(), stat.S_IMODE(source.stat().st_mode))


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
        member = tree.members[path]
        try:
            elf = read_elf(member.data)
        except ValueError as exc:
            raise ImageError(f"cannot read /{path} ({exc}): the package is damaged; build again") from exc
        wanted = [(name, "needed") for name in elf.needed]
        if elf.interpreter is not None:
            wanted.append((elf.interpreter, "interpreter"))
        for name, kind in wanted:
            if kind == "interpreter":
                location = unpacked.find(name)
                relative = name.lstrip("/")
                if location is not None and not os.path.lexists(location / relative):
                    relative = usr_path(relative)
            else:
                location, relative = index.get(name, (None, ""))
            if location is None:
                raise ImageError(
                    f"/{path} needs {name}, which no downloaded package has: add the package that ships it to packages"
                )
            copy_path(tree, location, relative)
            real = _follow(tree, usr_path(relative))
            if real is not None:
                pending.append(real)


def kernel_modules(kernel_dir: Path, version: str, wanted: Iterable[str]) -> list[tuple[str, bytes]]:
    """The modules ``wanted`` needs, dependencies first, uncompressed; built-in ones are skipped."""
    base = next(
        (kernel_dir / parent / version for parent in ("lib/modules", "usr/lib/modules") if (kernel_dir / parent / version).is_dir()),
        None,
    )
    if base is None:
        raise ImageError(f"kernel {version} ships no modules directory: use a Debian linux-image package")
    builtin: set[str] = set()
    if (base / "modules.builtin").is_file():
        for line in (base / "modules.builtin").read_text(encoding="utf-8").split():
            builtin.add(_module_name(line))
    files: dict[str, Path] = {}
    for path in (base / "kernel").rglob("*.ko*"):
        if path.name.endswith(_MODULE_SUFFIXES):
            files.setdefault(_module_name(path.name), path)
    ordered: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in files:
            needed_by = f" (needed by {chain[-1]})" if chain else ""
            raise ImageError(f"kernel {version} has no {name} module{needed_by}: use a kernel with virtio drivers")
        data = _decompress(files[name])
        depends = modinfo(data).get("depends", "")
        for dependency in filter(None, depends.split(",")):
            visit(dependency, (*chain, name))
        ordered.append((name, data))

    for name in wanted:
        visit(name, ())
    return ordered


def _module_name(path: str) -> str:
    name = posixpath.basename(path)
    for suffix in _MODULE_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def _decompress(path: Path) -> bytes:
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
    """Shared library file name -> (package directory, path in it), first package wins."""
    index: dict[str, tuple[Path, str]] = {}
    for directory in unpacked.packages.values():
        for parent in _LIBRARY_DIRS:
            base = directory / parent
            if not base.is_dir():
                continue
            for candidate in (*base.glob("*.so*"), *base.glob("*-linux-gnu*/*.so*")):
                index.setdefault(candidate.name, (directory, candidate.relative_to(directory).as_posix()))
    return index


def _follow(tree: Tree, path: str) -> str | None:
    """The regular file ``path`` ends up at through symlinks in the tree, if any."""
    for _ in range(40):
        member = tree.members.get(path)
        if member is None:
            return None
        if member.kind != "link":
            return path if member.kind == "file" else None
        path = usr_path(member.target) if member.target.startswith("/") else posixpath.normpath(
            posixpath.join(posixpath.dirname(path), member.target)
        )
    return None


def _existing(directory: Path, relative: str) -> str:
    return relative if os.path.lexists(directory / relative) else usr_path(relative)


def _newest_mtime(unpacked: Unpacked) -> int:
    """A timestamp for generated files that depends only on the packages, so rebuilds match."""
    newest = 0
    for directory in unpacked.packages.values():
        for path in directory.rglob("*"):
            newest = max(newest, int(path.lstat().st_mtime))
    return newest


def _link_applets(tree: Tree, unpacked: Unpacked) -> None:
    """One symlink per busybox applet, from the list the binary itself prints."""
    directory = unpacked.find("bin/busybox")
    assert directory is not None
    binary = directory / _existing(directory, "bin/busybox")
    try:
        listing = subprocess.run(
            [str(binary), "--list-full"], capture_output=True, text=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ImageError(
            f"cannot run the guest's busybox to list its applets ({exc}): build this image on a host of its architecture"
        ) from exc
    for line in listing.split():
        path = usr_path(line)
        if path not in tree.members and path != "linuxrc":  # linuxrc: for initrds, not a root's top level
            tree.link(path, "/usr/bin/busybox")


def _require(tree: Tree, path: str, recipe: Recipe, package: str) -> None:
    if path not in tree.members:
        raise ImageError(f"image {recipe.name!r} has no /{path}: add {package} to packages")


def dropbear_host_key(key: Ed25519PrivateKey) -> bytes:
    """The key in dropbear's own format: the strings "ssh-ed25519" and seed + public key.

    Written here rather than converted with dropbearconvert, which would have
    to run a guest binary on the host.
    """
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return b"".join(struct.pack(">I", len(part)) + part for part in (b"ssh-ed25519", seed + public))


def _write_system(tree: Tree, recipe: Recipe, host_key: Ed25519PrivateKey, client_key: str, has_agent: bool) -> None:
    """The files a busybox system needs; the recipe's files may replace them, except the plugin's own."""
    for name in ("bin", "sbin", "lib", "lib64"):
        tree.directory(f"usr/{name}")
        tree.link(name, f"usr/{name}")
    for name in ("dev", "proc", "sys", "run", "mnt", "home", "var/log", "etc/init.d"):
        tree.directory(name)
    for name in ("tmp", "var/tmp"):
        tree.directory(name, 0o1777)
    tree.link("var/run", "/run")
    user = recipe.user
    uid = 0 if user == "root" else 1000
    home = "root" if user == "root" else f"home/{user}"
    passwd = "root:x:0:0:root:/root:/bin/sh\n"
    group = "root:x:0:\ntty:x:5:\n"
    shadow = "root:*:0:0:99999:7:::\n"
    if uid:
        passwd += f"{user}:x:{uid}:{uid}::/{home}:/bin/sh\n"
        group += f"{user}:x:{uid}:\n"
        shadow += f"{user}:*:0:0:99999:7:::\n"
    agent = "::respawn:/etc/init.d/qemu-ga\n" if has_agent else ""
    defaults = {
        "etc/passwd": (passwd, 0o644),
        "etc/group": (group, 0o644),
        "etc/shadow": (shadow, 0o600),
        "etc/shells": ("/bin/sh\n", 0o644),
        "etc/nsswitch.conf": ("passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n", 0o644),
        "etc/profile": ("export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n", 0o644),
        "etc/os-release": (_os_release(recipe), 0o644),
        "etc/inittab": (_INITTAB.format(host_key=DROPBEAR_HOST_KEY, agent=agent), 0o644),
        "etc/init.d/rcS": (_RCS, 0o755),
        "etc/udhcpc/default.script": (_UDHCPC_SCRIPT, 0o755),
        "etc/resolv.conf": ("", 0o644),
    }
    if has_agent:
        defaults["etc/init.d/qemu-ga"] = (_AGENT_START, 0o755)
    for path, (text, mode) in defaults.items():
        tree.file(path, text.encode("utf-8"), mode)
    for item in recipe.files:
        tree.file(usr_path(item.path), item.content.lstrip("\n").encode("utf-8"), item.mode)
    # The plugin's guarantees come last, so no recipe file can break logging in.
    tree.directory(home, 0o700, uid, uid)
    tree.directory(f"{home}/.ssh", 0o700, uid, uid)
    tree.file(f"{home}/.ssh/authorized_keys", (client_key + "\n").encode("ascii"), 0o600, uid, uid)
    tree.file(DROPBEAR_HOST_KEY, dropbear_host_key(host_key), 0o600)
    tree.file(DROPBEAR_HOST_KEY + ".pub", (public_line(host_key) + "\n").encode("ascii"), 0o644)
    tree.file("etc/hostname", (recipe.name + "\n").encode("ascii"))
    tree.file("etc/hosts", f"127.0.0.1 localhost\n127.0.1.1 {recipe.name}\n".encode("ascii"))
    # No fsck pass: every guest boots a fresh overlay of a clean filesystem.
    tree.file("etc/fstab", b"/dev/vda / ext4 rw,relatime 0 0\n")


def _os_release(recipe: Recipe) -> str:
    pretty = recipe.description or f"{recipe.distribution} {recipe.version}"
    return (
        f'NAME="{recipe.distribution}"\nID={recipe.distribution}\nVERSION_ID="{recipe.version}"\n'
        f'PRETTY_NAME="{pretty}"\n'
    )
