"""Your own cloud image, by URL: Debian with cloud-init, served from 127.0.0.1, for each boot path.

Two images (each built once, cached by its recipe's digest; see cloudimage.py):
a UEFI one (GPT, systemd-boot) without a guest agent, whose guests run commands
through vmfx-runner (the seed installs it), and a BIOS one (MBR, GRUB) with
qemu-guest-agent, where no runner starts. Neither has
a key in it: everything the plugin needs reaches it through the NoCloud seed.
The tests run in file order, all of one image before the other, and share one
guest config per image, so the first boots and saves the ready state and the
others start from it.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import logging
import threading
from collections.abc import Iterator

import paramiko
import pytest

from pytest_vmfixtures import CommandTimeout, ImageError
from pytest_vmfixtures.channels.runner import GUEST_PATH as RUNNER_PATH
from pytest_vmfixtures.channels.runner import PORT_NAME as RUNNER_PORT
from pytest_vmfixtures.channels.ssh import SSH, SSHError, parse_host_key
from pytest_vmfixtures.fixtures import SESSION_KEY
from pytest_vmfixtures.images.byo import DEFAULT_USER, hostname_for

from . import cloudimage


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture(scope="module", params=sorted(cloudimage.VARIANTS))
def variant(request: pytest.FixtureRequest) -> cloudimage.Variant:
    return cloudimage.VARIANTS[request.param]


@pytest.fixture(scope="module")
def served(request: pytest.FixtureRequest, variant: cloudimage.Variant) -> Iterator[tuple[str, str]]:
    """(URL, sha256) of the variant's test cloud image, served over HTTP on the loopback."""
    missing = cloudimage.missing_tools()
    if missing:
        pytest.skip(f"building the test cloud image needs: {', '.join(missing)}")
    session = request.config.stash[SESSION_KEY]
    session.cache.ensure_writable()
    disk = cloudimage.ensure(session.cache, session.progress, variant.name)
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


def test_runs_as_root_through_the_seeded_user(cloud_vm, served, variant) -> None:
    _, sha256 = served
    # detected: a GPT with an ESP and no BIOS boot partition is UEFI; an MBR with a Linux partition, BIOS
    assert cloud_vm.built_image.firmware == variant.firmware
    assert cloud_vm.ssh_user == DEFAULT_USER
    result = cloud_vm.run("id -u; hostname; test -d /sys/firmware/efi && echo efi || echo bios", check=True)
    assert result.stdout.split() == ["0", hostname_for(sha256), "efi" if variant.firmware == "uefi" else "bios"]
    assert cloud_vm.os.id == "debian" and cloud_vm.os.version == "12"
    assert cloud_vm.os.init == "systemd"
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


def test_the_handle_picks_the_channel(cloud_vm, variant) -> None:
    """An image with the agent is driven through it; one without, through vmfx-runner; QMP works either way."""
    assert cloud_vm.channel == ("agent" if variant.agent else "runner")
    # Over SSH, commands log in as root (the seed authorizes the key for root too): no sudo in between.
    assert cloud_vm.run("id -u; echo \"sudo=${SUDO_USER:-}\"", check=True).stdout.split() == ["0", "sudo="]
    # vm.ssh is the login user's own session.
    _, out, _ = cloud_vm.ssh.exec_command("id -un")
    assert out.read().decode().strip() == DEFAULT_USER
    running = cloud_vm.run("systemctl is-active qemu-guest-agent").stdout.strip() == "active"
    assert running == variant.agent
    assert cloud_vm.qmp.execute("query-status")["status"] == "running"


def test_files_both_ways(cloud_vm, tmp_path) -> None:
    payload = bytes(range(256)) * 100
    (tmp_path / "up.bin").write_bytes(payload)
    cloud_vm.put(tmp_path / "up.bin", "/tmp/up.bin")  # the login user's files: it is not root
    assert cloud_vm.run("sha256sum /tmp/up.bin", check=True).stdout.split()[0] == hashlib.sha256(payload).hexdigest()
    cloud_vm.get("/tmp/up.bin", tmp_path / "down.bin")
    assert (tmp_path / "down.bin").read_bytes() == payload


def test_a_command_past_its_timeout_is_killed(cloud_vm) -> None:
    with pytest.raises(CommandTimeout):
        cloud_vm.run("sleep 601 & sleep 600 && touch /root/late", timeout=3)
    assert not cloud_vm.run("pgrep -x sleep").ok  # killed with its children, whichever channel ran it
    assert cloud_vm.run("echo still here", check=True).stdout == "still here\n"


def test_commands_keep_vm_runs_semantics_on_the_guests_channel(cloud_vm, variant) -> None:
    """vmfx-runner (no agent) and the agent run commands alike: /bin/sh as root in $HOME, umask 022, both
    streams, the exit code, nothing of the runner's own environment."""
    assert cloud_vm.channel == ("agent" if variant.agent else "runner")
    result = cloud_vm.run("id -u; pwd; umask; echo \"${VMFIX_RUN:+tagged}\"; echo oops >&2; exit 3")
    assert (result.returncode, result.stdout.split(), result.stderr) == (3, ["0", "/root", "0022", "tagged"], "oops\n")
    # a command killed by a signal is reported as a shell reports it
    assert cloud_vm.run("kill -KILL $$").returncode == 128 + 9
    # the agent preferred where the image has it: the runner is installed by the seed, but not started
    assert cloud_vm.run("systemctl is-active vmfx-runner").stdout.strip() == ("inactive" if variant.agent else "active")


# Inet sockets (any state) and listening unix sockets among a process's file descriptors, one line each.
SOCKETS_OF = (
    "for i in $(ls -l /proc/{pid}/fd | sed -n 's/.*socket:\\[\\([0-9]*\\)\\]$/\\1/p'); do "
    "awk -v i=$i '$10 == i {{print \"inet\", i}}' /proc/net/tcp /proc/net/tcp6 /proc/net/udp /proc/net/udp6; "
    "awk -v i=$i '$7 == i && $4 == \"00010000\" {{print \"listening\", i}}' /proc/net/unix; done"
)


def test_the_runner_is_root_only_and_off_the_network(cloud_vm, variant) -> None:
    """The runner has no network socket and listens on none; its port's device and its program are root's alone
    (written to as nobody: refused). An image with the agent runs no runner at all."""
    running = cloud_vm.run("pgrep -f 'vmfx-runner[.]py'").stdout.split()
    if variant.agent:
        assert running == []
        return
    (pid,) = running
    port = cloud_vm.run(f"grep -lx {RUNNER_PORT} /sys/class/virtio-ports/*/name", check=True).stdout.split("/")[-2]
    assert cloud_vm.run(f"stat -c %a:%U /dev/{port} {RUNNER_PATH}", check=True).stdout.split() == ["600:root", "700:root"]
    as_nobody = cloud_vm.run(f"setpriv --reuid=65534 --regid=65534 --clear-groups sh -c 'echo x > /dev/{port}'")
    assert as_nobody.returncode != 0 and "Permission denied" in as_nobody.stderr
    assert f"/dev/{port}" in cloud_vm.run(f"ls -l /proc/{pid}/fd", check=True).stdout
    assert cloud_vm.run(SOCKETS_OF.format(pid=pid), check=True).stdout == ""
    sshd = cloud_vm.run("pgrep -o -x sshd", check=True).stdout.strip()
    assert "inet" in cloud_vm.run(SOCKETS_OF.format(pid=sshd), check=True).stdout  # the check sees sshd's port


def test_a_test_that_kills_its_channel_falls_back_to_ssh(cloud_vm, variant, caplog) -> None:
    """vmfx-runner (or the agent) stopped for good by the test: the next command goes over SSH, with a warning."""
    # Through the login user's own SSH session; the runner's program removed, so that systemd cannot start it again.
    stop = "systemctl stop qemu-guest-agent" if variant.agent else f"rm {RUNNER_PATH} && systemctl kill -s KILL vmfx-runner"
    _, out, err = cloud_vm.ssh.exec_command(f"sudo -n sh -c '{stop}'")
    assert out.channel.recv_exit_status() == 0, err.read()
    with caplog.at_level(logging.WARNING, logger="pytest_vmfixtures"):
        result = cloud_vm.run("id -u", check=True)
    assert result.stdout == "0\n" and cloud_vm.channel == "ssh"
    assert any("falling back to SSH" in r.getMessage() for r in caplog.records)


def test_the_next_test_gets_its_channel_back(cloud_vm, variant, request) -> None:
    """The revert restores the guest as saved, its runner (or agent) resident and answering; the run's summary
    names the channel."""
    expected = "agent" if variant.agent else "runner"
    assert cloud_vm.channel == expected
    assert cloud_vm.run("systemctl is-active -q vmfx-runner").ok != variant.agent
    assert cloud_vm.channel == expected
    line = request.config.stash[SESSION_KEY].channel_line()
    assert f"{cloud_vm.config.label} {expected}" in line


def test_destructive_change(cloud_vm) -> None:
    cloud_vm.run("rm -f /usr/bin/apt-get && touch /root/dirty && efibootmgr >/dev/null 2>&1; true", check=True)
    assert not cloud_vm.run("test -e /usr/bin/apt-get").ok


def test_next_test_starts_clean(cloud_vm) -> None:
    assert cloud_vm.run("test -e /usr/bin/apt-get && test ! -e /root/dirty").ok
    # testinfra sees the same clean guest, through the same channel, as root
    host = cloud_vm.host
    assert host.check_output("id -u") == "0"
    assert host.file("/usr/bin/apt-get").exists and not host.file("/root/dirty").exists
    assert host.package("cloud-init").is_installed
    assert host.service("ssh").is_running
    assert host.user(DEFAULT_USER).exists
    assert host.run("exit 4").rc == 4


def test_changes_names_what_the_test_did_and_nothing_else(cloud_vm) -> None:
    # vm.changes() on your own image, with the agent or over SSH alone: reading reports nothing (cloud-init
    # and the login user's session leave nothing the defaults keep), a file written is the one change.
    cloud_vm.run("cat /etc/os-release >/dev/null; ls -laR /etc >/dev/null; id", check=True)
    assert str(cloud_vm.changes()) == "no changes"
    cloud_vm.run("echo x > /etc/vmfx-cloud && rm /etc/motd", check=True)
    changes = cloud_vm.changes()
    assert (changes.added, changes.modified, changes.removed) == (["/etc/vmfx-cloud"], [], ["/etc/motd"])


def test_freed_memory_is_reported_to_the_host(cloud_vm, request) -> None:
    """Free page reporting is on (the vendor's kernel zeroes no freed pages): what keeps the saved state small."""
    if request.config.stash[SESSION_KEY].pool.backend.name != "qemu":
        pytest.skip("the balloon is added by the qemu backend")
    assert cloud_vm.qmp.execute("query-balloon")["actual"] == 1024 << 20  # the device is there, not inflated
    # The guest's driver took the device and agreed to report (feature bit 5, VIRTIO_BALLOON_F_REPORTING).
    features = cloud_vm.run("cat /sys/bus/virtio/drivers/virtio_balloon/virtio*/features", check=True).stdout.strip()
    assert features[5] == "1"


def test_wrong_sha256_is_an_image_error_and_leaves_nothing(vm_factory, served, request) -> None:
    url, sha256 = served
    wrong = "0" * 64 if sha256 != "0" * 64 else "1" * 64
    cache = request.config.stash[SESSION_KEY].cache
    with pytest.raises(ImageError, match="sha256"):
        vm_factory(image=url, sha256=wrong)
    assert not (cache.root / "downloads" / wrong).exists()
    assert not [p for p in (cache.root / "tmp").iterdir() if wrong in p.name]
