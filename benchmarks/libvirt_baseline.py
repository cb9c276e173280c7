"""The baseline a libvirt user would pick: an internal snapshot, snapshot-revert, then a new SSH session.

Uses virsh against qemu:///system (root), with the same image, kernel, memory and network as our guests.
The domain is defined for the measurement and undefined afterwards, whatever happens.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from xml.sax.saxutils import escape

import paramiko

from pytest_vmfixtures.backends.common import create_overlay, free_port
from pytest_vmfixtures.channels.ssh import SSH
from pytest_vmfixtures.command import new_tag
from pytest_vmfixtures.images.image import BuiltImage

URI = "qemu:///system"

DOMAIN = """<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>{memory}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='unsafe'/>
      <source file='{overlay}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-netdev'/>
    <qemu:arg value='user,id=bn0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22'/>
    <qemu:arg value='-device'/>
    <qemu:arg value='virtio-net-pci,netdev=bn0,addr=0x10'/>
  </qemu:commandline>
</domain>
"""


class Unavailable(Exception):
    pass


def _virsh(*args: str, check: bool = True) -> str:
    result = subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise RuntimeError(f"virsh {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def measure(image: BuiltImage, memory_mb: int, n: int) -> list[float]:
    if shutil.which("virsh") is None:
        raise Unavailable("virsh not installed (apt install libvirt-daemon-system)")
    if subprocess.run(["virsh", "-c", URI, "version"], capture_output=True).returncode != 0:
        raise Unavailable(f"libvirtd not reachable at {URI} (start virtlogd -d and libvirtd -d)")
    workdir = Path(tempfile.mkdtemp(prefix="vmfx-libvirt-"))
    name = f"vmfx-bench-{uuid.uuid4().hex[:8]}"
    overlay = workdir / "overlay.qcow2"
    create_overlay("qemu-img", image.disk, overlay)
    port = free_port()
    xml = DOMAIN.format(name=name, memory=memory_mb, kernel=escape(str(image.kernel)), initrd=escape(str(image.initrd)),
                        cmdline=escape(image.cmdline), overlay=escape(str(overlay)), console=workdir / "console.log", port=port)
    (workdir / "domain.xml").write_text(xml)
    key = paramiko.Ed25519Key.from_private_key_file(str(image.client_key))
    samples: list[float] = []
    try:
        _virsh("define", str(workdir / "domain.xml"))
        _virsh("start", name)
        ssh = SSH("127.0.0.1", port, image.user, key, image.host_key, name)
        deadline = time.monotonic() + 600
        while True:
            try:
                ssh.connect(5)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        ssh.close()
        _virsh("snapshot-create-as", name, "clean")
        for _ in range(n):
            ssh.connect(30)
            ssh.exec("rm -rf /etc", new_tag(), 60)
            ssh.close()
            started = time.monotonic()
            _virsh("snapshot-revert", name, "clean", "--running")
            ssh.connect(60)
            ssh.exec("true", new_tag(), 60).check()
            samples.append(time.monotonic() - started)
            ssh.close()
    finally:
        _virsh("destroy", name, check=False)
        _virsh("undefine", name, "--snapshots-metadata", check=False)
        shutil.rmtree(workdir, ignore_errors=True)
    return samples
