"""Your own cloud image, by URL: a UEFI Debian with cloud-init, served from 127.0.0.1.

The image (built once, cached by its recipe's digest; see cloudimage.py) has no
key in it: everything the plugin needs reaches it through the NoCloud seed.
The tests run in file order and share one guest config, so the first boots
and saves the ready state and the others start from it.
"""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator

import paramiko
import pytest

from pytest_vmfixtures import ImageError
from pytest_vmfixtures.channels.ssh import SSH, SSHError, parse_host_key
from pytest_vmfixtures.fixtures import SESSION_KEY
from pytest_vmfixtures.images.byo import DEFAULT_USER, hostname_for

from . import cloudimage


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture(scope="module")
def served(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """(URL, sha256) of the test cloud image, served over HTTP on the loopback."""
    missing = cloudimage.missing_tools()
    if missing:
        pytest.skip(f"building the test cloud image needs: {', '.join(missing)}")
    session = request.config.stash[SESSION_KEY]
    session.cache.ensure_writable()
    disk = cloudimage.ensure(session.cache, session.progress)
    sha256 = str(session.cache.read_manifest(disk.parent)["files"][disk.name])  # type: ignore[index]
    handler = functools.partial(_QuietHandler, directory=str(disk.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/{disk.name}", sha256
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def cloud_vm(vm_factory, served):  # type: ignore[no-untyped-def]
    url, sha256 = served
    return vm_factory(image=url, sha256=sha256, memory_mb=1024)


def test_runs_as_root_through_the_seeded_user(cloud_vm, served) -> None:
    _, sha256 = served
    assert cloud_vm.built_image.firmware == "uefi"  # detected: GPT, an ESP, no BIOS boot partition
    assert cloud_vm.ssh_user == DEFAULT_USER
    result = cloud_vm.run("id -u; hostname; test -d /sys/firmware/efi && echo efi", check=True)
    assert result.stdout.split() == ["0", hostname_for(sha256), "efi"]
    assert cloud_vm.os.id == "debian" and cloud_vm.os.version == "12"
    # no password logins: cloud-init turned them off
    assert cloud_vm.run("sshd -T 2>/dev/null | grep -i '^passwordauthentication'").stdout.split()[-1] == "no"


def test_ssh_uses_the_pinned_host_key(cloud_vm) -> None:
    pinned = parse_host_key(cloud_vm.built_image.host_key)
    transport = cloud_vm.ssh.get_transport()
    assert transport.get_remote_server_key() == pinned
    # Another key pinned: the client refuses the guest.
    other = SSH(
        cloud_vm.ssh_host, cloud_vm.ssh_port, cloud_vm.ssh_user,
        paramiko.Ed25519Key.from_private_key_file(str(cloud_vm.ssh_key)),
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBN8SLbNRK1mI14XnxZBJb6rSQ2Ls9Oq1FsUvOmAvvzN", "imposter-check",
    )
    with pytest.raises(SSHError, match="host key mismatch"):
        other.connect(timeout=20)


def test_destructive_change(cloud_vm) -> None:
    cloud_vm.run("rm -f /usr/bin/apt-get && touch /root/dirty && efibootmgr >/dev/null 2>&1; true", check=True)
    assert not cloud_vm.run("test -e /usr/bin/apt-get").ok


def test_next_test_starts_clean(cloud_vm) -> None:
    assert cloud_vm.run("test -e /usr/bin/apt-get && test ! -e /root/dirty").ok


def test_wrong_sha256_is_an_image_error_and_leaves_nothing(vm_factory, served, request) -> None:
    url, sha256 = served
    wrong = "0" * 64 if sha256 != "0" * 64 else "1" * 64
    cache = request.config.stash[SESSION_KEY].cache
    with pytest.raises(ImageError, match="sha256"):
        vm_factory(image=url, sha256=wrong)
    assert not (cache.root / "downloads" / wrong).exists()
    assert not [p for p in (cache.root / "tmp").iterdir() if wrong in p.name]
