"""Your own cloud image (UEFI) through libvirt: the NVRAM frozen with the state, one per restored guest.

What the user sees (login, seed, revert) is tests/integration/test_cloud_image.py, run with
--vm-backend libvirt; this checks what only the backend can: the files behind the guests.
"""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
from rig import missing as rig_missing

from pytest_vmfixtures.backends.base import MachineConfig
from pytest_vmfixtures.backends.libvirt import LibvirtMachine
from pytest_vmfixtures.errors import ImageError
from pytest_vmfixtures.images import qcow2
from pytest_vmfixtures.images.cache import Cache
from pytest_vmfixtures.pool import Pool
from pytest_vmfixtures.runtime import Runtime

PoolFactory = Callable[..., tuple[Pool, Runtime]]


def domains(uri: str) -> list[str]:
    out = subprocess.run(["virsh", "-c", uri, "list", "--all", "--name"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def _cloudimage() -> ModuleType:
    """tests/integration/cloudimage.py, which builds the test cloud image (this directory is not a package)."""
    path = Path(__file__).resolve().parents[1] / "integration" / "cloudimage.py"
    spec = importlib.util.spec_from_file_location("vmfx_test_cloudimage", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def cloud_disk(cache: Cache, variant: str = "uefi") -> Path:
    """The test cloud image's disk, built once into ``cache``; the test is skipped where it cannot be built."""
    cloudimage = _cloudimage()
    missing = cloudimage.missing_tools()
    if missing:
        rig_missing(f"building the test cloud image needs: {', '.join(missing)}")
    disk: Path = cloudimage.ensure(cache, lambda message: print(f"  {message}", flush=True), variant=variant)
    return disk


@pytest.fixture(scope="module")
def cloud_config(cache: Cache) -> MachineConfig:
    disk = cloud_disk(cache)
    sha256 = str(cache.read_manifest(disk.parent)["files"][disk.name])  # type: ignore[index]
    return MachineConfig(str(disk), memory_mb=1024, sha256=sha256)


@pytest.fixture(scope="module")
def cloud_pool(pool_factory: PoolFactory, primary_uri: str) -> Iterator[Pool]:
    pool, runtime = pool_factory([primary_uri])
    try:
        yield pool
    finally:
        pool.close()
        runtime.close()


def test_each_restored_uefi_guest_overlays_the_nvram_frozen_with_the_state(
    cloud_pool: Pool, cloud_config: MachineConfig, primary_uri: str,
) -> None:
    slot = cloud_pool._slot(cloud_config)
    assert slot.image.firmware == "uefi"
    frozen = slot.state.directory / "nvram.qcow2"
    assert frozen.is_file() and not frozen.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO)
    first, second = slot.new_instance(), slot.new_instance()
    try:
        machines = [first.machine, second.machine]
        assert all(isinstance(m, LibvirtMachine) for m in machines)
        nvrams = [m.nvram for m in machines if isinstance(m, LibvirtMachine)]
        assert None not in nvrams and len(set(nvrams)) == 2
        for nvram in nvrams:
            assert nvram is not None and qcow2.backing_file(nvram) == frozen
        # Both run on it, and write their own variables: QEMU has each NVRAM open read-write.
        for instance in (first, second):
            assert instance.machine.qmp.human("savevm probe").strip() == ""  # the NVRAM is qcow2: snapshots work
            assert instance.machine.qmp.human("loadvm probe").strip() == ""
            instance.machine.after_load()
        args = subprocess.run(["ps", "-ww", "-o", "args=", "-C", "qemu-system-x86_64"], capture_output=True, text=True,
                              timeout=30).stdout
        for nvram in nvrams:
            assert f"if=pflash,format=qcow2,unit=1,file={nvram}" in args
    finally:
        for instance in (first, second):
            instance.close()
    for nvram in nvrams:
        assert nvram is not None and not nvram.exists()
    names = {m.domain_name for m in machines if isinstance(m, LibvirtMachine)}
    assert not names & set(domains(primary_uri))


def test_a_cloud_guest_that_fails_to_start_leaves_no_nvram_or_overlay(
    cloud_pool: Pool, cloud_config: MachineConfig, tmp_path: Path,
) -> None:
    """The state's frozen NVRAM gone: the start fails with qemu-img's words, and nothing is left behind."""
    slot = cloud_pool._slot(cloud_config)
    backend = cloud_pool.backend
    state = slot.state
    broken = type(state)(tmp_path, state.disk, state.memory, state.key)  # a directory without nvram.qcow2
    before = set(os.listdir(cloud_pool.runtime.run_dir))
    with pytest.raises(Exception, match="nvram.qcow2"):
        backend.restore(slot.image, cloud_config, broken, "cloud-broken-1")
    leftover = cloud_pool.runtime.run_dir / "cloud-broken-1"
    assert not leftover.exists() or not [p.name for p in leftover.iterdir() if p.suffix == ".qcow2"]
    assert set(os.listdir(cloud_pool.runtime.run_dir)) - before <= {"cloud-broken-1"}


def test_remote_hosts_only_refuse_a_cloud_guest_in_one_line(
    pool_factory: PoolFactory, cloud_config: MachineConfig, remote_uri: str,
) -> None:
    """Its seed and NVRAM are files here, not uploaded: refused before anything is started or copied there."""
    pool, runtime = pool_factory([remote_uri])
    try:
        uploads = pool.backend.hosts[0].storage.uploads  # type: ignore[attr-defined]
        with pytest.raises(ImageError) as caught:
            pool.acquire(cloud_config)
        message = str(caught.value)
        assert "\n" not in message
        assert f"not on {remote_uri}: add such a --vm-libvirt-uri, or use --vm-backend qemu" in message
        assert pool.backend.hosts[0].storage.uploads == uploads  # type: ignore[attr-defined]
        assert not [n for n in domains(remote_uri) if n.startswith(f"vmfx-{runtime.session_id}-")]
    finally:
        pool.close()
        runtime.close()
