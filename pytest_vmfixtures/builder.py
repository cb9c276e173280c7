"""Turn a recipe into a bootable image directory, with or without root.

mmdebstrap builds the root filesystem straight into an ext2 image: as an
ordinary user it works inside a user namespace (``--mode=auto`` picks
``unshare``), so no step here needs root, loop devices or mounts. Recipes
with ``builder = "extract"`` get a minimal busybox system instead, unpacked
from packages without installing them (see :mod:`pytest_vmfixtures.extract`),
and genext2fs writes its ext2 image. Either filesystem is then grown and
turned into ext4 with e2fsprogs and stored as qcow2, so guests boot from
throwaway overlays on top of it.

Every image gets its own SSH client key and sshd host key, generated here in
Python: the client can pin the host key instead of trusting whatever answers.
"""

from __future__ import annotations

import collections
import contextlib
import getpass
import hashlib
import io
import os
import platform
import shlex
import shutil
import signal
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pytest_vmfixtures.errors import ImageError
from pytest_vmfixtures.image import BuiltImage, GuestOS

if TYPE_CHECKING:
    from pytest_vmfixtures.catalog import Recipe

# Part of every recipe digest: bump it whenever a change here changes what
# an image contains, so cached images built by older code are rebuilt.
BUILDER_VERSION = "1"
# The same for what only another builder than mmdebstrap writes: bumping one
# rebuilds the images that builder makes and leaves the others alone.
BUILDER_VARIANT_VERSIONS = {"extract": "1"}

DISK_NAME = "disk.qcow2"
KERNEL_NAME = "vmlinuz"
INITRD_NAME = "initrd.img"
CLIENT_KEY_NAME = "id_ed25519"
HOST_KEY_NAME = "ssh_host_ed25519_key.pub"

_ARCHES = {"amd64": "x86_64", "arm64": "aarch64", "i386": "i386", "riscv64": "riscv64"}
_MMDEBSTRAP_DISTRIBUTIONS = ("debian", "ubuntu")
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
# mmdebstrap asks arch-test whether this host can run another architecture's binaries (i386 on amd64, too).
_FOREIGN_TOOLS = {"arch-test": "arch-test"}
_PACKAGE_MANAGERS = {"mmdebstrap": "apt", "extract": "none"}

# Key-only logins without reverse DNS, GSSAPI or PAM: each saves time on
# every connection, and a test guest has no passwords to check anyway. A
# drop-in is read before the main sshd_config, and for sshd the first value
# wins, so these override the distribution's defaults.
_SSHD_CONFIG = """\
# Written by pytest-vmfixtures: fast key-only logins for throwaway test guests.
HostKey /etc/ssh/ssh_host_ed25519_key
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UseDNS no
GSSAPIAuthentication no
UsePAM no
PrintLastLog no
"""

# Runs inside the finished tree (chrooted), after the recipe's packages are
# installed, from the staged copy at _GUEST_STAGE. Recipe files and commands
# come first, so the guarantees the plugin relies on are applied last and win.
_GUEST_STAGE = "/var/tmp/vmfixtures"
_CUSTOMIZE = """\
set -eu
stage={stage}
user={user}
{recipe_steps}
[ -d /etc/ssh ] || {{ echo "E: no /etc/ssh: add openssh-server to packages" >&2; exit 1; }}
home=$(getent passwd "$user" | cut -d: -f6)
[ -n "$home" ] || {{ echo "E: user $user does not exist: create it in commands" >&2; exit 1; }}
install -d -m 0700 "$home/.ssh"
install -m 0600 "$stage/authorized_keys" "$home/.ssh/authorized_keys"
chown -R "$user:" "$home/.ssh"
rm -f /etc/ssh/ssh_host_*
install -m 0600 "$stage/ssh_host_ed25519_key" /etc/ssh/ssh_host_ed25519_key
install -m 0644 "$stage/ssh_host_ed25519_key.pub" /etc/ssh/ssh_host_ed25519_key.pub
install -D -m 0644 "$stage/sshd.conf" /etc/ssh/sshd_config.d/00-vmfixtures.conf
install -m 0644 "$stage/fstab" /etc/fstab
install -m 0644 "$stage/hostname" /etc/hostname
install -m 0644 "$stage/hosts" /etc/hosts
rm -f /etc/resolv.conf
: > /etc/resolv.conf
sed -i 's/^root:[^:]*:/root:*:/' /etc/shadow
if [ -x /usr/sbin/qemu-ga ]; then echo agent=1; else echo agent=0; fi > "$stage/out/facts"
kernel=$(ls /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1)
[ -n "$kernel" ] || {{ echo "E: no kernel in /boot: add a linux-image package" >&2; exit 1; }}
version=${{kernel#/boot/vmlinuz-}}
[ -f "/boot/initrd.img-$version" ] || {{ echo "E: no initrd for $version: add initramfs-tools" >&2; exit 1; }}
if ! grep -qs '^CONFIG_VIRTIO_BLK=y' "/boot/config-$version"; then
    lsinitramfs "/boot/initrd.img-$version" | grep -q '/virtio_blk\\.ko' || {{
        echo "E: virtio_blk is neither built in nor in the initrd: root=/dev/vda cannot mount" >&2
        exit 1
    }}
fi
cp "$kernel" "$stage/out/{kernel}"
cp "/boot/initrd.img-$version" "$stage/out/{initrd}"
"""


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
    stage = out_dir / ".stage"
    raw = out_dir / "rootfs.ext2"
    disk = out_dir / DISK_NAME
    try:
        stage.mkdir(mode=0o700)
        client = _write_client_key(out_dir)
        host = Ed25519PrivateKey.generate()
        host_key = public_line(host)
        (out_dir / HOST_KEY_NAME).write_text(host_key + "\n", encoding="ascii")
        if recipe.builder == "extract":
            has_agent = _build_extracted(recipe, stage, raw, host, client, progress)
        else:
            archive = _write_stage(recipe, stage, host, client)
            progress(f"bootstrapping {recipe.release} with mmdebstrap")
            _run_mmdebstrap(recipe, archive, raw, progress)
            has_agent = (stage / "facts").read_text(encoding="ascii").strip() == "agent=1"
        for name in (KERNEL_NAME, INITRD_NAME):
            os.replace(stage / name, out_dir / name)
        progress(f"making ext4 of {recipe.disk_size}")
        _finish_filesystem(raw, recipe.disk_size_bytes)
        progress(f"converting to {DISK_NAME}")
        run_tool(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(disk)])
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        raw.unlink(missing_ok=True)
    for name in (DISK_NAME, KERNEL_NAME, INITRD_NAME, HOST_KEY_NAME, CLIENT_KEY_NAME + ".pub"):
        (out_dir / name).chmod(0o444)
    with disk.open("rb") as handle:
        disk_sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
    BuiltImage(
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
        host_key=host_key,
        arch=arch,
        os=GuestOS(
            id=recipe.distribution,
            version=recipe.version,
            init=recipe.init,
            package_manager=_PACKAGE_MANAGERS[recipe.builder],
        ),
        agent=has_agent,
        built_at=time.time(),
        builder_version=BUILDER_VERSION,
    ).save()
    progress(f"built {recipe.name} in {time.monotonic() - started:.0f} s")


def _build_extracted(
    recipe: Recipe, stage: Path, raw: Path, host: Ed25519PrivateKey, client: str, progress: Callable[[str], None]
) -> bool:
    """The extract builder's part: kernel and initrd into ``stage``, the root as the ext2 ``raw``."""
    from pytest_vmfixtures import extract  # imports this module: loaded only when needed

    root_tar = stage / "root.tar"
    result = extract.build(recipe, stage / "work", root_tar, host, client, progress)
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


def _check_recipe(recipe: Recipe) -> str:
    """Refuse what this builder cannot make before spending a minute on it."""
    if recipe.builder == "mmdebstrap" and recipe.distribution not in _MMDEBSTRAP_DISTRIBUTIONS:
        raise ImageError(
            f"image {recipe.name!r}: cannot build distribution {recipe.distribution!r}; "
            f"use one of {', '.join(_MMDEBSTRAP_DISTRIBUTIONS)}"
        )
    if recipe.architecture not in _ARCHES:
        raise ImageError(
            f"image {recipe.name!r}: unsupported architecture {recipe.architecture!r}; use one of {', '.join(_ARCHES)}"
        )
    return _ARCHES[recipe.architecture]


def host_tools(recipe: Recipe, rootless: bool = True) -> dict[str, str]:
    """Every host program building ``recipe`` runs, and the Debian package that has it."""
    tools = {**_BUILDER_TOOLS[recipe.builder], **_TOOLS}
    if recipe.builder == "mmdebstrap":
        if rootless:
            tools.update(_ROOTLESS_TOOLS)
        if _ARCHES.get(recipe.architecture) != platform.machine():
            tools.update(_FOREIGN_TOOLS)
    return tools


def have_tool(tool: str) -> bool:
    """Whether ``tool`` is on PATH or in the sbin directories an ordinary user's PATH may lack."""
    return shutil.which(tool) is not None or shutil.which(tool, path="/usr/sbin:/sbin") is not None


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
        _check_subordinate_ids(getpass.getuser(), os.getuid())


def _check_subordinate_ids(user: str, uid: int) -> None:
    """Rootless mmdebstrap maps the image's users onto the caller's subuids."""
    for table in (Path("/etc/subuid"), Path("/etc/subgid")):
        try:
            lines = table.read_text(encoding="utf-8").splitlines()
        except OSError:
            lines = []
        owners = {line.split(":", 1)[0] for line in lines if line.count(":") == 2}
        if user not in owners and str(uid) not in owners:
            raise ImageError(
                f"user {user} has no entry in {table}, which building images without root "
                f"needs: run 'sudo usermod --add-subuids 100000-165535 "
                f"--add-subgids 100000-165535 {user}' or build as root"
            )


def _write_client_key(out_dir: Path) -> str:
    """Write the client key pair the plugin logs in with; return the public line."""
    client = Ed25519PrivateKey.generate()
    public = public_line(client)
    fd = os.open(out_dir / CLIENT_KEY_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:  # created 0600: ssh clients refuse looser modes
        handle.write(_private_bytes(client))
    (out_dir / (CLIENT_KEY_NAME + ".pub")).write_text(public + "\n", encoding="ascii")
    return public


def public_line(key: Ed25519PrivateKey) -> str:
    """The ``ssh-ed25519 AAAA...`` line of a key, as authorized_keys and known_hosts hold it."""
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode("ascii")
    )


def _private_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )


def _write_stage(recipe: Recipe, stage: Path, host_key: Ed25519PrivateKey, client: str) -> Path:
    """Pack everything the guest side needs into one tarball; return its path.

    A tarball because rootless mmdebstrap runs hooks as a subordinate uid that
    cannot read the caller's files; its ``tar-in`` reads them as the caller and
    keeps the owners and modes set here.
    """
    steps: list[str] = []
    members: dict[str, tuple[bytes, int]] = {}
    for index, item in enumerate(recipe.files):
        members[f"files/{index}"] = (item.content.lstrip("\n").encode("utf-8"), 0o600)
        source = shlex.quote(f"{_GUEST_STAGE}/files/{index}")
        steps.append(f"install -D -m {item.mode:04o} {source} {shlex.quote(item.path)}")
    for command in recipe.commands:
        steps.append(f"/bin/sh -c {shlex.quote(command)}")
    members["customize.sh"] = (
        _CUSTOMIZE.format(
            stage=shlex.quote(_GUEST_STAGE),
            user=shlex.quote(recipe.user),
            recipe_steps="\n".join(steps),
            kernel=KERNEL_NAME,
            initrd=INITRD_NAME,
        ).encode("utf-8"),
        0o700,
    )
    members["authorized_keys"] = (client.encode("ascii") + b"\n", 0o600)
    members["ssh_host_ed25519_key"] = (_private_bytes(host_key), 0o600)
    members["ssh_host_ed25519_key.pub"] = (public_line(host_key).encode("ascii") + b"\n", 0o644)
    members["sshd.conf"] = (_SSHD_CONFIG.encode("ascii"), 0o644)
    # No fsck pass: every guest boots a fresh overlay of a clean filesystem.
    members["fstab"] = (b"/dev/vda / ext4 rw,relatime 0 0\n", 0o644)
    members["hostname"] = (recipe.name.encode("ascii") + b"\n", 0o644)
    members["hosts"] = (
        f"127.0.0.1 localhost\n127.0.1.1 {recipe.name}\n::1 localhost ip6-localhost ip6-loopback\n".encode("ascii"),
        0o644,
    )
    archive = stage / "stage.tar"
    top = _GUEST_STAGE.rsplit("/", 1)[1]
    with tarfile.open(archive, "w") as tar:
        for directory in (top, f"{top}/files", f"{top}/out"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o700
            tar.addfile(info)
        for name, (data, mode) in members.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return archive


def _run_mmdebstrap(recipe: Recipe, archive: Path, target: Path, progress: Callable[[str], None]) -> None:
    """Run mmdebstrap, passing its info lines on and keeping the tail for errors."""
    stage = archive.parent
    parent = _GUEST_STAGE.rsplit("/", 1)[0]
    out = f"{_GUEST_STAGE}/out"
    command = [
        "mmdebstrap",
        "--mode=auto",
        f"--variant={recipe.variant}",
        f"--architectures={recipe.architecture}",
        "--format=ext2",
        # Stage in, run the guest-side script, take kernel and initrd out, clean up.
        f"--customize-hook=tar-in {archive} {parent}",
        f'--customize-hook=chroot "$1" /bin/sh {_GUEST_STAGE}/customize.sh',
        f"--customize-hook=copy-out {out}/{KERNEL_NAME} {out}/{INITRD_NAME} {out}/facts {stage}",
        f'--customize-hook=rm -rf "$1{_GUEST_STAGE}"',
    ]
    if recipe.packages:
        command.append("--include=" + ",".join(recipe.packages))
    command += [recipe.release, str(target), recipe.mirror, *recipe.extra_sources]
    tail: collections.deque[str] = collections.deque(maxlen=8)
    errors: list[str] = []  # apt's "E:" lines say what went wrong; the tail says where
    # Its own session: on errors mmdebstrap signals its whole process group,
    # which would otherwise kill the test run that started the build.
    with subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        start_new_session=True,
    ) as process:
        assert process.stderr is not None
        # The loop below blocks on mmdebstrap's output, so the deadline is a timer: SIGTERM first, so
        # mmdebstrap unmounts and removes its tempdir, then the loop ends with its output.
        expired = threading.Event()

        def stop_at_deadline() -> None:
            expired.set()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)

        timer = threading.Timer(MMDEBSTRAP_TIMEOUT, stop_at_deadline)
        timer.daemon = True
        timer.start()
        try:
            for line in process.stderr:
                line = line.rstrip()
                tail.append(line)
                if line.startswith("E: ") and len(errors) < 5:
                    errors.append(line)
                if line.startswith("I: "):
                    progress(line[3:])
        except BaseException:
            # Interrupted: SIGTERM lets mmdebstrap unmount and remove its tempdir.
            os.killpg(process.pid, signal.SIGTERM)
            raise
        finally:
            timer.cancel()
    if expired.is_set():
        raise ImageError(f"mmdebstrap did not finish building {recipe.name!r} within {MMDEBSTRAP_TIMEOUT:g} s "
                         "and was stopped; check the mirror is reachable and fast")
    if process.returncode != 0:
        raise ImageError(
            f"mmdebstrap failed building {recipe.name!r} (exit {process.returncode}); "
            "fix the recipe or the host as its messages say:\n" + "\n".join(errors or tail)
        )


def _kill_group(process: subprocess.Popen[str]) -> None:
    """SIGKILL a tool started in its own session, and everything it started; then reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _finish_filesystem(raw: Path, size: int) -> None:
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


TOOL_TIMEOUT = 1200.0  # seconds for one build step (apt-get download, genext2fs, qemu-img convert, ...)
MMDEBSTRAP_TIMEOUT = 3600.0  # a whole bootstrap, downloads included


def run_tool(
    command: Sequence[str], ok: Sequence[int] = (0,), hint: str = "check the host's disk space and tools",
    timeout: float = TOOL_TIMEOUT,
) -> None:
    """Run one tool with a deadline; on failure say which, what to do, and what it printed.

    A build holds its cache lock: a tool that hangs is killed (with its children) at ``timeout``,
    so it cannot stall every worker waiting for that lock.
    """
    env = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}
    with subprocess.Popen(list(command), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, errors="replace", env=env, start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            raise ImageError(f"{command[0]} did not finish within {timeout:g} s and was killed; {hint}") from None
        except BaseException:
            _kill_group(process)
            raise
    result = subprocess.CompletedProcess(list(command), process.returncode, stdout, stderr)
    if result.returncode not in ok:
        lines = (result.stderr or result.stdout).strip().splitlines()
        # apt's "E:" lines say what went wrong; otherwise the tail says where.
        shown = [line for line in lines if line.startswith("E: ")][:5] or lines[-10:]
        raise ImageError(f"{command[0]} failed (exit {result.returncode}); {hint}:\n" + "\n".join(shown))
