"""The mmdebstrap builder's part: a full Debian system, bootstrapped without root.

As an ordinary user mmdebstrap works inside a user namespace (``--mode=auto``
picks ``unshare``), so no step needs root, loop devices or mounts. The recipe's
files and commands, the SSH keys and the plugin's guest settings travel in one
staged tarball and are applied by a script run in the finished tree.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import shlex
import signal
import subprocess
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..errors import ImageError
from .image import INITRD_NAME, KERNEL_NAME
from .keys import private_bytes, public_line
from .tools import dying_with_us

if TYPE_CHECKING:
    from .recipe import Recipe

MMDEBSTRAP_TIMEOUT = 3600.0  # a whole bootstrap, downloads included

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
# installed, from the staged copy at GUEST_STAGE. Recipe files and commands
# come first, so the guarantees the plugin relies on are applied last and win.
GUEST_STAGE = "/var/tmp/vmfixtures"
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
# vmlinuz on most architectures; riscv64's Debian kernel is an uncompressed vmlinux.
kernel=$(ls /boot/vmlinuz-* /boot/vmlinux-* 2>/dev/null | sort -V | tail -n 1)
[ -n "$kernel" ] || {{ echo "E: no kernel in /boot: add a linux-image package" >&2; exit 1; }}
version=${{kernel#/boot/vmlinu?-}}
cp "$kernel" "$stage/out/{kernel}"
# A foreign build brings an initrd made on the host (images/foreign.py); a native one uses the guest's.
[ -z "${{VMFIXTURES_HOST_INITRD:-}}" ] || exit 0
[ -f "/boot/initrd.img-$version" ] || {{ echo "E: no initrd for $version: add initramfs-tools" >&2; exit 1; }}
if ! grep -qs '^CONFIG_VIRTIO_BLK=y' "/boot/config-$version"; then
    lsinitramfs "/boot/initrd.img-$version" | grep -q '/virtio_blk\\.ko' || {{
        echo "E: virtio_blk is neither built in nor in the initrd: root=/dev/vda cannot mount" >&2
        exit 1
    }}
fi
cp "/boot/initrd.img-$version" "$stage/out/{initrd}"
"""


def check_subordinate_ids(user: str, uid: int) -> None:
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


def write_stage(
    recipe: Recipe, stage: Path, host_key: Ed25519PrivateKey, client: str,
    extra: dict[str, tuple[bytes, int]] | None = None,
) -> Path:
    """Pack everything the guest side needs into one tarball; return its path.

    A tarball because rootless mmdebstrap runs hooks as a subordinate uid that
    cannot read the caller's files; its ``tar-in`` reads them as the caller and
    keeps the owners and modes set here. ``extra`` adds members (name: data,
    mode) beside the customize script, as a foreign build's second stage.
    """
    steps: list[str] = []
    members: dict[str, tuple[bytes, int]] = {}
    for index, item in enumerate(recipe.files):
        members[f"files/{index}"] = (item.content.lstrip("\n").encode("utf-8"), 0o600)
        source = shlex.quote(f"{GUEST_STAGE}/files/{index}")
        steps.append(f"install -D -m {item.mode:04o} {source} {shlex.quote(item.path)}")
    for command in recipe.commands:
        steps.append(f"/bin/sh -c {shlex.quote(command)}")
    members["customize.sh"] = (
        _CUSTOMIZE.format(
            stage=shlex.quote(GUEST_STAGE),
            user=shlex.quote(recipe.user),
            recipe_steps="\n".join(steps),
            kernel=KERNEL_NAME,
            initrd=INITRD_NAME,
        ).encode("utf-8"),
        0o700,
    )
    members["authorized_keys"] = (client.encode("ascii") + b"\n", 0o600)
    members["ssh_host_ed25519_key"] = (private_bytes(host_key), 0o600)
    members["ssh_host_ed25519_key.pub"] = (public_line(host_key).encode("ascii") + b"\n", 0o644)
    members["sshd.conf"] = (_SSHD_CONFIG.encode("ascii"), 0o644)
    # No fsck pass: every guest boots a fresh overlay of a clean filesystem.
    members["fstab"] = (b"/dev/vda / ext4 rw,relatime 0 0\n", 0o644)
    members["hostname"] = (recipe.name.encode("ascii") + b"\n", 0o644)
    members.update(extra or {})
    members["hosts"] = (
        f"127.0.0.1 localhost\n127.0.1.1 {recipe.name}\n::1 localhost ip6-localhost ip6-loopback\n".encode("ascii"),
        0o644,
    )
    archive = stage / "stage.tar"
    top = GUEST_STAGE.rsplit("/", 1)[1]
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


def native_command(recipe: Recipe, archive: Path, target: Path) -> list[str]:
    """The whole build in one mmdebstrap run: install, then customize in a chroot of the new tree."""
    stage = archive.parent
    parent = GUEST_STAGE.rsplit("/", 1)[0]
    out = f"{GUEST_STAGE}/out"
    command = [
        "mmdebstrap",
        "--mode=auto",
        f"--variant={recipe.variant}",
        f"--architectures={recipe.architecture}",
        "--format=ext2",
        # Stage in, run the guest-side script, take kernel and initrd out, clean up.
        f"--customize-hook=tar-in {archive} {parent}",
        f'--customize-hook=chroot "$1" /bin/sh {GUEST_STAGE}/customize.sh',
        f"--customize-hook=copy-out {out}/{KERNEL_NAME} {out}/{INITRD_NAME} {out}/facts {stage}",
        f'--customize-hook=rm -rf "$1{GUEST_STAGE}"',
    ]
    if recipe.packages:
        command.append("--include=" + ",".join(recipe.packages))
    return [*command, recipe.release, str(target), recipe.mirror, *recipe.extra_sources]


def run(recipe: Recipe, command: list[str], progress: Callable[[str], None]) -> None:
    """Run mmdebstrap's ``command``, passing its info lines on and keeping the tail for errors."""
    tail: collections.deque[str] = collections.deque(maxlen=8)
    errors: list[str] = []  # apt's "E:" lines say what went wrong; the tail says where
    # Its own session: on errors mmdebstrap signals its whole process group,
    # which would otherwise kill the test run that started the build.
    with subprocess.Popen(
        dying_with_us(command),  # killed with pytest (stderr is read as it comes, below)
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
