"""Real guests through the libvirt backend, driven with the pool directly (no plugin options yet).

Needs libvirtd at qemu:///system (or VMFX_LIBVIRT_URI) and libvirt-python: without them a test fails in CI
(CI=true) and skips elsewhere (rig.py).
The two-host tests use a second libvirtd: VMFX_LIBVIRT_URI2 if set, else one started here by
second_libvirtd.sh (root only) and stopped at the end.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from rig import import_libvirt, missing

from pytest_vmfixtures.accel import AccelChoice, choose_accel, probe_host
from pytest_vmfixtures.images.byo import ByoSpec, prepare
from pytest_vmfixtures.images.cache import Cache, default_cache_dir
from pytest_vmfixtures.images.catalog import BUILTIN_IMAGES_DIR
from pytest_vmfixtures.images.image import BuiltImage
from pytest_vmfixtures.pool import Pool
from pytest_vmfixtures.runtime import Runtime

libvirt = import_libvirt()

from pytest_vmfixtures.backends.libvirt import LibvirtBackend  # noqa: E402

HERE = Path(__file__).resolve().parent
PRIMARY_URI = os.environ.get("VMFX_LIBVIRT_URI", "qemu:///system")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/libvirt" in str(item.path):
            item.add_marker(pytest.mark.integration)


def reachable(uri: str) -> str | None:
    """None if libvirtd answers at ``uri``, else why not."""
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        return f"libvirtd not reachable at {uri}: {exc.get_error_message()} (start virtlogd -d; libvirtd -d)"
    conn.close()
    return None


def require(uri: str) -> str:
    """``uri``, or fail (CI) or skip the test that needs it if libvirtd does not answer there."""
    why = reachable(uri)
    if why:
        missing(why)
    return uri


@pytest.fixture(scope="session")
def primary_uri() -> str:
    return require(PRIMARY_URI)


@pytest.fixture(scope="session")
def second_uri(primary_uri: str) -> Iterator[str]:
    uri = os.environ.get("VMFX_LIBVIRT_URI2")
    started = False
    if not uri:
        script = str(HERE / "second_libvirtd.sh")
        uri = subprocess.run([script, "uri"], capture_output=True, text=True, timeout=10).stdout.strip()
        if reachable(uri) is not None:  # not running yet: start it here, and stop it at the end
            if os.geteuid() != 0 or shutil.which("unshare") is None:
                missing("no second libvirtd: set VMFX_LIBVIRT_URI2, or run as root to start one here")
            result = subprocess.run([script, "start"], capture_output=True, text=True, timeout=60)
            if result.returncode != 0:
                missing(f"cannot start a second libvirtd: {result.stderr.strip()}")
            started = True
    yield require(uri)
    if started:
        subprocess.run([str(HERE / "second_libvirtd.sh"), "stop"], timeout=60)


@pytest.fixture(scope="session")
def remote_uri(second_uri: str) -> str:
    """The second libvirtd again, reached the way a hypervisor elsewhere is (see second_libvirtd.sh)."""
    uri = os.environ.get("VMFX_LIBVIRT_REMOTE_URI") or subprocess.run(
        [str(HERE / "second_libvirtd.sh"), "remote-uri"], capture_output=True, text=True, timeout=10
    ).stdout.strip()
    return require(uri)


@pytest.fixture(scope="session")
def ssh_uri(second_uri: str) -> Iterator[str]:
    """The second libvirtd through a test sshd on 127.0.0.2, as qemu+ssh:// (see ssh_hypervisor.sh)."""
    script = str(HERE / "ssh_hypervisor.sh")
    if os.geteuid() != 0 or not Path("/usr/sbin/sshd").exists():
        missing("the qemu+ssh:// test needs root and openssh-server (for a throwaway sshd on 127.0.0.2)")
    result = subprocess.run(["sh", script, "start"], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, VMFX_LIBVIRTD2_DIR=str(Path(second_socket_dir(second_uri)))))
    if result.returncode != 0:
        missing(f"cannot start the test sshd: {result.stderr.strip()}")
    try:
        yield require(result.stdout.strip())
    finally:
        subprocess.run(["sh", script, "stop"], timeout=60)


def second_socket_dir(uri: str) -> str:
    """The second libvirtd's directory, from its URI's socket parameter (.../sock/libvirt-sock)."""
    socket_path = parse_qs(urlsplit(uri).query).get("socket", [""])[0]
    if not socket_path:
        missing(f"{uri} names no socket: the qemu+ssh:// test needs the second libvirtd of second_libvirtd.sh")
    return str(Path(socket_path).parent.parent)


@pytest.fixture(scope="session")
def accel() -> AccelChoice:
    return choose_accel(os.environ.get("VMFX_ACCEL", "auto"), probe_host())


@pytest.fixture(scope="session")
def cache() -> Cache:
    cache = Cache(Path(os.environ.get("VMFX_CACHE", str(default_cache_dir()))))
    cache.ensure_writable()
    return cache


@pytest.fixture(scope="session", autouse=True)
def _quiet_paramiko() -> None:
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)  # refused logins while a guest boots are expected


@pytest.fixture(scope="session")
def nat_network(primary_uri: str) -> Iterator[str]:
    """Snapshot mode's libvirt network: VMFX_NAT_NETWORK if set, else the private one nat_network.sh makes
    (root only: it needs dnsmasq and iptables), removed again at the end if this session made it."""
    given = os.environ.get("VMFX_NAT_NETWORK")
    if given:
        yield given
        return
    if os.geteuid() != 0 or shutil.which("dnsmasq") is None:
        missing("snapshot mode's NAT network needs root and dnsmasq (dnsmasq-base); or set VMFX_NAT_NETWORK")
    script = str(HERE / "nat_network.sh")
    name = "vmfx-nat"
    conn = libvirt.open(primary_uri)
    try:
        there = name in conn.listNetworks()  # active already (scripts/test starts it): leave it to its owner
    finally:
        conn.close()
    if there:
        yield name
        return
    result = subprocess.run(["sh", script, "start"], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, LIBVIRT_URI=primary_uri))
    if result.returncode != 0:
        pytest.fail(f"cannot start the NAT network: {result.stderr.strip()}")
    try:
        yield result.stdout.strip()
    finally:
        subprocess.run(["sh", script, "stop"], timeout=60, env=dict(os.environ, LIBVIRT_URI=primary_uri))


def make_pool(cache: Cache, accel: AccelChoice, uris: list[str], standby: int = 1,
              network: str | None = None) -> tuple[Pool, Runtime]:
    """``network``: the backend in snapshot mode, its guests on that libvirt network."""
    runtime = Runtime(cache.root, "libvirt-tests")
    try:
        backend = (LibvirtBackend(runtime, accel, uris) if network is None
                   else LibvirtBackend(runtime, accel, uris, mode="snapshot", network=network))
    except BaseException:
        runtime.close()
        raise
    pool = Pool(backend, cache, runtime, [BUILTIN_IMAGES_DIR], accel=accel.accel, standby=standby,
                progress=lambda message: print(f"  {message}", flush=True))
    return pool, runtime


@pytest.fixture(scope="session")
def pool_factory(cache: Cache, accel: AccelChoice) -> Callable[..., tuple[Pool, Runtime]]:
    """make_pool(uris, standby=1) -> (pool, runtime); the caller closes both."""
    return lambda uris, standby=1, network=None: make_pool(cache, accel, uris, standby, network)


TEST_DRIVER = "test:///default"  # libvirt's own test driver: no guest runs, every call is answered


@pytest.fixture
def test_driver_backend(cache: Cache, accel: AccelChoice) -> Iterator[LibvirtBackend]:
    """The libvirt backend in snapshot mode on libvirt's test driver (the portable path, not QEMU's)."""
    runtime = Runtime(cache.root, "test-driver")
    made = LibvirtBackend(runtime, accel, [TEST_DRIVER], mode="snapshot", network="default")
    try:
        yield made
    finally:
        made.close()
        runtime.close()


@pytest.fixture(scope="session")
def bios_cloud_image(cache: Cache) -> BuiltImage:
    """Your own cloud image as the portable path runs it: the BIOS stand-in (tests/integration/cloudimage.py)."""
    from test_cloud_guest import cloud_disk

    return prepare(cache, ByoSpec(str(cloud_disk(cache, "bios"))), print)
