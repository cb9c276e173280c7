"""The files that turn unpacked programs into a bootable busybox system.

The extract builder copies programs out of packages; this module writes what
a distribution's packages and installer would otherwise have set up: the
initramfs's ``/init``, busybox init's inittab and boot script, DHCP, the
user database, and the plugin's login guarantees (keys, hostname, fstab).
Boot steps are few and short on purpose: under emulation every process a
boot script starts costs tens of milliseconds.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..keys import public_line
from .fstree import Tree, usr_path

if TYPE_CHECKING:
    from ..recipe import Recipe

DROPBEAR_HOST_KEY = "etc/dropbear/dropbear_ed25519_host_key"
AGENT_PORT_NAME = "org.qemu.guest_agent.0"
INITRAMFS_APPLETS = ("sh", "mount", "umount", "insmod", "sleep", "switch_root", "cat", "echo")

_INIT = """\
#!/bin/sh
# initramfs: load the virtio drivers, mount the root disk, hand over to its init (init= on the command line).
# Exiting panics the kernel, which the plugin reports with the console log.
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
for module in {modules}; do
    insmod "/lib/modules/$module.ko" || echo "initramfs: cannot load $module"
done
root=/dev/vda
init=/sbin/init
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        root=*) root=${{arg#root=}} ;;
        init=*) init=${{arg#init=}} ;;
    esac
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
exec switch_root /newroot "$init"
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


def initramfs(busybox: bytes, modules: Sequence[tuple[str, bytes]], mtime: int) -> bytes:
    """The uncompressed cpio: busybox, the modules in load order, and ``/init``."""
    tree = Tree(mtime)
    tree.file("bin/busybox", busybox, 0o755)
    for applet in INITRAMFS_APPLETS:
        tree.link(f"bin/{applet}", "busybox")
    for directory in ("dev", "proc", "sys", "newroot"):
        tree.directory(directory)
    tree.char_device("dev/console", 5, 1)
    for name, data in modules:
        tree.file(f"lib/modules/{name}.ko", data)
    tree.file("init", _INIT.format(modules=" ".join(name for name, _ in modules)).encode(), 0o755)
    return tree.cpio()


def dropbear_host_key(key: Ed25519PrivateKey) -> bytes:
    """The key in dropbear's own format: the strings "ssh-ed25519" and seed + public key.

    Written here rather than converted with dropbearconvert, which would have
    to run a guest binary on the host.
    """
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return b"".join(struct.pack(">I", len(part)) + part for part in (b"ssh-ed25519", seed + public))


def write_system(tree: Tree, recipe: Recipe, host_key: Ed25519PrivateKey, client_key: str, has_agent: bool) -> None:
    """Add the system files; the recipe's files may replace them, except the plugin's own.

    ``client_key`` is the public line that may log in as the recipe's user.
    """
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
    tree.file(DROPBEAR_HOST_KEY + ".pub", (public_line(host_key) + "\n").encode("ascii"))
    tree.file("etc/hostname", (recipe.name + "\n").encode("ascii"))
    tree.file("etc/hosts", f"127.0.0.1 localhost\n127.0.1.1 {recipe.name}\n".encode("ascii"))
    # No fsck pass: every guest boots a fresh overlay of a clean filesystem.
    tree.file("etc/fstab", b"/dev/vda / ext4 rw,relatime 0 0\n")


def _os_release(recipe: Recipe) -> str:
    """What ``vm.os`` reads: ID is the recipe's distribution, VERSION_ID its version."""
    pretty = recipe.description or f"{recipe.distribution} {recipe.version}"
    return (
        f'NAME="{recipe.distribution}"\nID={recipe.distribution}\nVERSION_ID="{recipe.version}"\n'
        f'PRETTY_NAME="{pretty}"\n'
    )
