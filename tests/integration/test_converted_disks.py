"""Each disk format the portable libvirt path converts to boots under QEMU, which reads them all.

The ``tiny`` image (the fastest to boot here) is converted to vmdk, vdi and vhdx with the
plugin's own converter, and each conversion is booted through the QEMU backend: the guest's qcow2
overlay sits on the converted disk (backing format vmdk, vdi or vhdx), the guest comes up and
answers a command that reads its disk. tiny boots its kernel directly, so this proves the
conversion is complete and readable, not that a firmware finds a boot loader in it; the bytes are
also compared with the original on the host.

The guests are driven through the backend directly, without the pool: the pool would save a ready
state, and QEMU refuses to migrate (save) a guest with a vmdk, vdi or vhdx node in its disk chain
("The vmdk format used by node ... does not support live migration"). The portable path does not
save states that way (its clean state is a hypervisor snapshot in the hypervisor's own format).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from pytest_vmfixtures.accel import AccelChoice, choose_accel, probe_host
from pytest_vmfixtures.backends.base import MachineConfig
from pytest_vmfixtures.backends.libvirt.convert import converted_disk
from pytest_vmfixtures.backends.qemu import QemuBackend
from pytest_vmfixtures.command import new_tag
from pytest_vmfixtures.errors import QMPError
from pytest_vmfixtures.fixtures import SESSION_KEY
from pytest_vmfixtures.images.cache import Cache, ensure_image, sha256_file
from pytest_vmfixtures.images.catalog import BUILTIN_IMAGES_DIR
from pytest_vmfixtures.images.image import BuiltImage
from pytest_vmfixtures.instance import bind_channels, wait_ssh_ready
from pytest_vmfixtures.runtime import Runtime

BOOT_TIMEOUT = 600.0


@pytest.fixture(scope="module")
def cache(request: pytest.FixtureRequest) -> Cache:
    return Cache(request.config.stash[SESSION_KEY].settings.cache_dir)


@pytest.fixture(scope="module")
def tiny(cache: Cache) -> BuiltImage:
    return ensure_image(cache, "tiny", [BUILTIN_IMAGES_DIR], print)


@pytest.fixture(scope="module")
def backend(cache: Cache) -> Iterator[tuple[QemuBackend, AccelChoice]]:
    accel = choose_accel("auto", probe_host())
    runtime = Runtime(cache.root, "converted-disks")
    backend = QemuBackend(runtime, accel)
    try:
        yield backend, accel
    finally:
        try:
            backend.close()
        finally:
            runtime.close()


def boot_and_read(backend: QemuBackend, accel: AccelChoice, image: BuiltImage) -> str:
    """Boot ``image``, wait for SSH, return the sha256 of a file the guest reads from its disk."""
    machine = backend.boot(image, MachineConfig("tiny"), backend.runtime.new_name(image.name))
    instance = bind_channels(machine, image, agent=False)
    try:
        wait_ssh_ready(instance, BOOT_TIMEOUT, accel.accel)
        result = instance.ssh.exec("busybox sha256sum /bin/busybox", new_tag(), 120)
        assert result.ok, result.stderr
        return result.stdout.split()[0]
    finally:
        instance.close()


@pytest.fixture(scope="module")
def original_digest(tiny: BuiltImage, backend: tuple[QemuBackend, AccelChoice]) -> str:
    """What the unconverted image's guest reads."""
    return boot_and_read(*backend, tiny)


@pytest.mark.parametrize("disk_format", ["vmdk", "vdi", "vhdx"])
def test_a_converted_disk_boots_under_qemu(cache: Cache, tiny: BuiltImage, backend: tuple[QemuBackend, AccelChoice],
                                           original_digest: str, disk_format: str) -> None:
    converted = converted_disk(cache, tiny, disk_format)
    same = subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", disk_format, str(tiny.disk),
                           str(converted)], capture_output=True, text=True, timeout=300)
    assert same.returncode == 0, f"{same.stdout}{same.stderr}"
    image = replace(tiny, name=f"tiny-{disk_format}", disk=converted, disk_format=disk_format,
                    disk_sha256=sha256_file(converted))
    assert boot_and_read(*backend, image) == original_digest


def test_qemu_cannot_save_a_guest_on_a_converted_disk(cache: Cache, tiny: BuiltImage, tmp_path: Path,
                                                      backend: tuple[QemuBackend, AccelChoice]) -> None:
    """Why the pool is not used above: QEMU's save (a migration) refuses vmdk in the chain."""
    converted = converted_disk(cache, tiny, "vmdk")
    image = replace(tiny, name="tiny-vmdk", disk=converted, disk_format="vmdk", disk_sha256=sha256_file(converted))
    qemu, _ = backend
    machine = qemu.boot(image, MachineConfig("tiny"), qemu.runtime.new_name(image.name))
    try:
        chain = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", "--backing-chain",
                                           str(machine.paths.overlay)],
                                          capture_output=True, text=True, check=True, timeout=60).stdout)
        assert [layer["format"] for layer in chain] == ["qcow2", "vmdk"]  # the overlay sits on the vmdk itself
        with pytest.raises(QMPError, match="does not support live migration"):
            qemu.save(machine, tmp_path)
    finally:
        machine.stop()
