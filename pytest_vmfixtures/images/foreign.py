"""Images of another CPU architecture, built with no root, no binfmt_misc and no qemu-user.

A native build runs the new system's programs in a chroot; a foreign build
cannot, so it works the way debootstrap's ``--second-stage`` does, with the
guest's own kernel doing the running:

1. On the host, mmdebstrap's ``extract`` variant downloads the packages (the
   essential set, apt and the recipe's) for the foreign architecture and
   unpacks them into an ext2 image, keeping the .debs and apt's lists.
   Nothing of the foreign architecture runs, so neither emulation of
   programs nor root is needed. The image's kernel, its modules and a static
   busybox are copied out on the way.
2. The ext2 is grown and turned into ext4, and the unpacked kernel boots it
   under QEMU system emulation from a small initramfs made on the host
   (busybox and the virtio and ext4 modules). As PID 1, :data:`STAGE2`
   installs every package with one offline dpkg run from the kept .debs
   (apt checks the result), runs the same customize script as a native
   build, writes the kernel and facts as a tar onto a second disk, cleans up
   and powers off. The host reads that tar; the initramfs the second stage
   booted is the image's initrd (mkinitramfs would take minutes emulated).
"""

from __future__ import annotations

import collections
import os
import shlex
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..arch import Arch, missing_firmware
from ..errors import ImageError
from .image import INITRD_NAME, KERNEL_NAME
from .minimal import system
from .minimal.extract import kernel_modules
from .mmdebstrap import GUEST_STAGE
from .tools import dying_with_us, kill_group, run_tool

if TYPE_CHECKING:
    from .recipe import Recipe

STAGE2_TIMEOUT = 3600.0  # installing a few hundred packages under emulation
STAGE2_MEMORY_MB = 2048
STAGE2_NAME = "stage2.sh"
STAGE2_INITRD = "stage2-initrd"
OUT_DISK_BYTES = 512 << 20
# The initramfs mounts the unpacked root with these; Debian builds them as modules on every port.
STAGE2_MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4")
# Only for the initramfs: unpacked, never installed (the second stage removes its files).
INITRAMFS_PACKAGE = "busybox-static"
_MARK = "vmfixtures-stage2:"
RESULT_FILES = (KERNEL_NAME, "facts")  # the initrd is the host's (see STAGE2)
_VARIANT_PATTERNS = {
    "essential": ["?essential"],
    "apt": ["?essential", "apt"],
    "required": ["?essential", "?priority(required)", "apt"],
    "minbase": ["?essential", "?priority(required)", "apt"],
    "important": ["?essential", "?priority(required)", "?priority(important)", "apt"],
}

# PID 1 of the second stage. Every exit path powers the machine off (QEMU runs with -no-reboot and
# the kernel with panic=-1, so even a crash of this script ends QEMU); success is the tar on vdb.
STAGE2 = """\
#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive DEBCONF_NONINTERACTIVE_SEEN=true
stage={stage}
step() {{ echo "{mark} [$(date +%T)] $*"; }}
finish() {{ sync; mount -o remount,ro / 2>/dev/null; sync; echo o > /proc/sysrq-trigger; sleep 30; }}
fail() {{ step "FAILED: $*"; finish; }}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
# No service starts while packages are configured; no init system runs to start it anyway.
printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d
# No initrd is made in here: mkinitramfs starts hundreds of programs, minutes under emulation. The
# image boots the initramfs this stage started from (busybox and the modules of the virt machine),
# made on the host. Outside this stage update-initramfs is the package's own again.
dpkg-divert --quiet --local --rename --divert /usr/sbin/update-initramfs.vmfixtures --add /usr/sbin/update-initramfs
printf '#!/bin/sh\\nexit 0\\n' > /usr/sbin/update-initramfs && chmod 0755 /usr/sbin/update-initramfs
cd /var/cache/apt/archives || fail "no downloaded packages"
debs=""
for deb in *.deb; do
    case "$deb" in {initramfs_only}_*) ;; *) debs="$debs $deb" ;; esac
done
# One dpkg run, as mmdebstrap installs the essential set: every file is unpacked already, so a
# maintainer script finds what it needs whatever order dpkg picks; dpkg then configures in
# dependency order. apt checks the result.
step "installing {count} packages and what they depend on"
dpkg --force-depends --force-unsafe-io --install $debs || fail "dpkg could not install the packages"
apt-get check || fail "the installed packages' dependencies are broken"
if [ -n "{initramfs_only}" ]; then
    # Unpacked only to build the initramfs from: remove its files.
    dpkg-deb --fsys-tarfile {initramfs_only}_*.deb | tar -t | while read -r path; do
        [ -d "/$path" ] || rm -f "/$path"
    done
fi
rm -f /usr/sbin/update-initramfs
dpkg-divert --quiet --local --rename --remove /usr/sbin/update-initramfs || fail "cannot restore update-initramfs"
cd /
step "customizing"
VMFIXTURES_HOST_INITRD=1 sh "$stage/customize.sh" || fail "the customize script failed"
tar -cf /dev/vdb -C "$stage/out" . || fail "cannot write the results"
rm -rf "$stage" /usr/sbin/policy-rc.d
apt-get clean
rm -rf /var/lib/apt/lists/* /var/log/apt/* /var/log/dpkg.log
# Give the blocks of the deleted .debs back (the disk is attached with discard=unmap): the image stays
# as small as a native one instead of carrying a gigabyte of freed blocks.
fstrim / || step "fstrim failed: the image keeps the deleted packages' blocks"
step "done"
finish
"""


def extract_command(recipe: Recipe, archive: Path, target: Path, host_files: Path) -> list[str]:
    """Stage one: mmdebstrap unpacks everything into the ext2 ``target`` and runs nothing."""
    parent = GUEST_STAGE.rsplit("/", 1)[0]
    merged = " ".join(("bin", "sbin", "lib"))
    command = [
        "mmdebstrap",
        "--mode=auto",
        "--variant=extract",
        f"--architectures={recipe.architecture}",
        "--format=ext2",
        "--skip=cleanup/apt",  # the second stage installs from the kept .debs, offline
        # Merged /usr as debootstrap sets it up, before anything is unpacked through the links.
        f'--setup-hook=for d in {merged}; do ln -s "usr/$d" "$1/$d"; mkdir -p "$1/usr/$d"; done',
        f"--extract-hook=tar-in {archive} {parent}",
        f"--extract-hook=copy-out /boot /usr/lib/modules /usr/bin/busybox {host_files}",
    ]
    patterns, names = _selection(recipe)
    command += [f"--include={pattern}" for pattern in patterns]
    command.append("--include=" + ",".join([*names, *recipe.packages, INITRAMFS_PACKAGE]))
    return [*command, recipe.release, str(target), recipe.mirror, *recipe.extra_sources]


def stage2_script(recipe: Recipe) -> bytes:
    initramfs_only = "" if INITRAMFS_PACKAGE in recipe.packages else INITRAMFS_PACKAGE
    count = len(_selection(recipe)[1]) + len(recipe.packages)
    return STAGE2.format(stage=shlex.quote(GUEST_STAGE), mark=_MARK, count=count,
                         initramfs_only=initramfs_only).encode("utf-8")


def _selection(recipe: Recipe) -> tuple[list[str], list[str]]:
    """What the recipe's variant installs besides its packages: apt patterns, and package names."""
    if recipe.variant not in _VARIANT_PATTERNS:
        raise ImageError(f"image {recipe.name!r}: variant {recipe.variant!r} cannot be built for another "
                         f"architecture; use one of {', '.join(_VARIANT_PATTERNS)}")
    chosen = _VARIANT_PATTERNS[recipe.variant]
    return [p for p in chosen if p.startswith("?")], [p for p in chosen if not p.startswith("?")]


def initramfs(host_files: Path) -> tuple[Path, bytes]:
    """The unpacked kernel, and an initramfs that mounts the root with its modules."""
    kernels = sorted((host_files / "boot").glob("vmlinu[zx]-*"))  # riscv64's is an uncompressed vmlinux
    if len(kernels) != 1:
        what = "no kernel" if not kernels else f"{len(kernels)} kernels"
        raise ImageError(f"the packages hold {what}: list exactly one linux-image package in packages")
    version = kernels[0].name[len("vmlinuz-"):]
    if (host_files / "modules").is_dir():  # copy-out put /usr/lib/modules here as modules/
        (host_files / "lib").mkdir(exist_ok=True)
        os.replace(host_files / "modules", host_files / "lib" / "modules")
    modules = kernel_modules(host_files, version, STAGE2_MODULES)
    busybox = (host_files / "busybox").read_bytes()
    return kernels[0], system.initramfs(busybox, modules, 0)


def stage2_command(
    binary: str, arch: Arch, kernel: Path, initrd: Path, root: Path, out: Path, console: Path, cpus: int
) -> list[str]:
    """QEMU for the second stage: TCG (the host cannot run the guest's code), no network, no reboot."""
    append = f"console={arch.console} root=/dev/vda rw init={GUEST_STAGE}/{STAGE2_NAME} panic=-1 quiet"
    argv = [binary, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-machine", arch.machine]
    if arch.tcg_cpu:
        argv += ["-cpu", arch.tcg_cpu]
    argv += ["-accel", "tcg,thread=multi", "-m", str(STAGE2_MEMORY_MB), "-smp", str(cpus)]
    argv += ["-kernel", str(kernel), "-initrd", str(initrd), "-append", append]
    for index, (path, cache) in enumerate(((root, "unsafe,discard=unmap"), (out, "none"))):
        argv += ["-drive", f"file={_opt(path)},format=raw,if=none,id=disk{index},cache={cache}",
                 "-device", f"virtio-blk-pci,drive=disk{index}"]
    return [*argv, "-serial", f"file:{console}"]  # the legacy file: form takes the rest as the path, commas and all


def _opt(path: object) -> str:
    """A path as a value in QEMU's ``key=value,...`` syntax, where a comma is written twice (as backends' opt())."""
    return str(path).replace(",", ",,")


def run_stage2(
    recipe: Recipe, arch: Arch, binary: str, work: Path, root: Path, progress: Callable[[str], None],
    timeout: float = STAGE2_TIMEOUT,
) -> Path:
    """Boot the unpacked root under emulation until the second stage powers off; return the results' directory."""
    if missing_firmware(arch):
        raise ImageError(f"building {recipe.name!r} needs {', '.join(missing_firmware(arch))}: "
                         f"install the {arch.firmware_package} package")
    kernel, cpio = initramfs(work / "host")
    initrd = work / STAGE2_INITRD
    initrd.write_bytes(cpio)
    out = work / "out.raw"
    with out.open("wb") as handle:
        handle.truncate(OUT_DISK_BYTES)
    console = work / "stage2-console.log"
    cpus = max(1, min(4, os.cpu_count() or 1))
    argv = stage2_command(binary, arch, kernel, initrd, root, out, console, cpus)
    progress(f"second stage: installing the packages under {binary} (emulated; several minutes)")
    started = time.monotonic()
    seen = 0
    errors = work / "stage2-qemu.log"  # a file, not a pipe nobody reads while QEMU runs: it could fill and block QEMU
    with errors.open("wb") as stderr_file, subprocess.Popen(
            dying_with_us(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr_file,
            start_new_session=True) as process:
        try:
            while process.poll() is None:
                if time.monotonic() - started > timeout:
                    kill_group(process)  # type: ignore[arg-type]
                    raise ImageError(
                        f"the second stage of {recipe.name!r} did not finish within {timeout:g} s and was stopped; "
                        f"the console said:\n{_tail(console)}")
                seen = _report(console, seen, progress)
                time.sleep(1.0)
        except BaseException:
            kill_group(process)  # type: ignore[arg-type]
            raise
    stderr = errors.read_bytes()[-4000:].decode(errors="replace")
    _report(console, seen, progress)
    results = work / "results"
    results.mkdir()
    _read_results(out, results)
    if not (results / "facts").is_file():
        detail = f"QEMU: {stderr.strip()}\n" if process.returncode else ""
        raise ImageError(f"the second stage of {recipe.name!r} failed under emulation; "
                         f"fix the recipe as the console says:\n{detail}{_tail(console)}")
    progress(f"second stage done in {time.monotonic() - started:.0f} s")
    return results


def _read_results(out: Path, results: Path) -> None:
    """Take the known result files out of the tar the guest wrote on its output disk; nothing else."""
    try:
        with tarfile.open(out, "r:") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                source = tar.extractfile(member) if member.isfile() else None
                if name in RESULT_FILES and source is not None:
                    (results / name).write_bytes(source.read())
    except (tarfile.TarError, OSError):
        pass  # no tar (the guest failed before writing it): the caller reports the console


def _report(console: Path, seen: int, progress: Callable[[str], None]) -> int:
    """Pass the second stage's own step lines on; return how many lines were read."""
    try:
        lines = console.read_text(errors="replace").splitlines()
    except OSError:
        return seen
    for line in lines[seen:]:
        if _MARK in line:
            progress("second stage: " + line.split(_MARK, 1)[1].strip())
    return len(lines)


def _tail(console: Path, lines: int = 25) -> str:
    try:
        text = console.read_text(errors="replace")
    except OSError:
        return "(no console output)"
    tail: collections.deque[str] = collections.deque(text.splitlines(), maxlen=lines)
    return "\n".join(tail)


def copy_results(work: Path, results: Path, stage: Path) -> None:
    """Kernel and facts from the guest; the initrd the second stage booted, which boots every guest."""
    for name in RESULT_FILES:
        os.replace(results / name, stage / name)
    os.replace(work / STAGE2_INITRD, stage / INITRD_NAME)


def check_filesystem(raw: Path) -> None:
    # Exit status 1 means "fixed something"; the guest powered off without unmounting.
    run_tool(["e2fsck", "-f", "-y", str(raw)], ok=(0, 1))
