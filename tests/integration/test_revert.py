"""Each test starts from the clean state, whatever the test before it did.

A wreck and its check are one test: it wrecks the guest, proves the wreck took, reverts with vm.revert()
(the same reset the plugin runs between tests) and proves the wreck is gone. So the verdict does not
depend on which tests xdist hands to which worker, or in what order. That the plugin does revert between
tests is shown by the inner suites of test_wheel.py and test_nonroot.py, which run serially in file order.
"""

from __future__ import annotations

import time

import pytest

from pytest_vmfixtures import CommandError, CommandTimeout
from pytest_vmfixtures.arch import by_name


def test_wrecked_packages_and_etc_are_reverted(vm):
    vm.run("dpkg --purge --force-all procps iproute2 >/dev/null 2>&1; rm -rf /etc /root", timeout=300)
    assert not vm.run("test -e /etc/passwd").ok
    assert not vm.run("test -d /root").ok
    vm.revert()
    assert vm.run("dpkg -s procps && test -e /etc/passwd && test -d /root").ok


def test_a_killed_and_deleted_sshd_is_reverted(vm):
    vm.run("rm -f /usr/sbin/sshd; pkill -KILL sshd; true", check=True)
    assert not vm.run("test -e /usr/sbin/sshd").ok
    assert not vm.run("pgrep -x sshd").ok
    vm.revert()
    assert vm.run("test -x /usr/sbin/sshd").ok
    _, stdout, _ = vm.ssh.exec_command("echo over-ssh")
    assert stdout.read().decode().strip() == "over-ssh"


def test_a_written_file_is_reverted(vm):
    vm.run("echo dirty > /var/tmp/marker", check=True)
    assert vm.run("cat /var/tmp/marker", check=True).stdout == "dirty\n"
    vm.revert()
    assert not vm.run("test -e /var/tmp/marker").ok


def test_run_result_fields(vm):
    result = vm.run("echo out; echo err >&2; exit 3")
    assert (result.returncode, result.stdout, result.stderr, result.ok) == (3, "out\n", "err\n", False)


def test_check_raises_command_error(vm):
    with pytest.raises(CommandError) as info:
        vm.run("echo partial; echo bad >&2; false", check=True)
    assert info.value.returncode == 1
    assert info.value.stdout == "partial\n"
    assert info.value.stderr == "bad\n"


def test_command_timeout_leaves_guest_usable(vm):
    # The shell's first start in a restored guest is translated anew under emulation: seconds on a loaded
    # host (a libvirt guest once printed nothing within 10 s). Started once first, it prints at once.
    vm.run("true", check=True)
    with pytest.raises(CommandTimeout) as info:
        vm.run("echo started; sleep 120 & sleep 120", timeout=10)
    assert info.value.timeout == 10
    assert info.value.stdout == "started\n"  # what the command printed before it was killed
    assert vm.run("echo alive", check=True).stdout == "alive\n"
    assert not vm.run("pgrep -x sleep").ok  # the command and its child were killed


def test_guest_clock_is_current(vm):
    guest = int(vm.run("date +%s", check=True).stdout)
    assert abs(guest - time.time()) < 30


def test_a_clock_set_wrong_is_the_hosts_again_after_a_revert(vm):
    """The revert sets the clock from the host at the moment it is set: not from a time computed before a
    shell started (seconds behind on a loaded host), not the state's own (when it was saved)."""
    vm.run("date -u -s @86400 >/dev/null 2>&1 || date -u -s '1970-01-02 00:00:00' >/dev/null", check=True)
    assert int(vm.run("date +%s", check=True).stdout) < 200_000
    vm.revert()
    before = time.time()
    guest = int(vm.run("date +%s", check=True).stdout)  # whole seconds: busybox date has no %N
    after = time.time()
    # Through the agent the time is set exactly; over SSH it lags by the time a shell takes to start.
    behind = 1 if vm.channel == "agent" else 15
    assert int(before) - behind <= guest <= after + 1


@pytest.mark.vm(needs=["qmp"])
def test_qmp_query_status(vm):
    assert vm.qmp.execute("query-status")["status"] == "running"


@pytest.mark.vm(needs=["qmp"])
def test_qmp_error_is_clear(vm):
    from pytest_vmfixtures import QMPError

    with pytest.raises(QMPError) as info:
        vm.qmp.execute("no-such-command")
    assert info.value.error_class == "CommandNotFound"


def test_put_get_round_trip(vm, tmp_path):
    payload = bytes(range(256)) * 400
    (tmp_path / "up.bin").write_bytes(payload)
    vm.put(tmp_path / "up.bin", "/root/up.bin")
    assert vm.run("sha256sum /root/up.bin", check=True).stdout.split()[0] == __import__("hashlib").sha256(payload).hexdigest()
    vm.get("/root/up.bin", tmp_path / "down.bin")
    assert (tmp_path / "down.bin").read_bytes() == payload


@pytest.mark.vm(needs=["qmp"])  # vm.snapshot and vm.revert(name) are QEMU's savevm and loadvm
def test_named_snapshot_and_revert(vm):
    vm.run("echo one > /root/f", check=True)
    vm.snapshot("one")
    vm.run("echo two > /root/f", check=True)
    vm.revert("one")
    assert vm.run("cat /root/f", check=True).stdout == "one\n"
    vm.revert()
    assert not vm.run("test -e /root/f").ok


def test_reboot(vm):
    before = vm.run("cat /proc/sys/kernel/random/boot_id", check=True).stdout
    vm.run("touch /root/survives-reboot", check=True)
    vm.reboot()
    assert vm.run("cat /proc/sys/kernel/random/boot_id", check=True).stdout != before
    assert vm.run("test -e /root/survives-reboot").ok


def test_handle_facts(vm, request):
    assert vm.image == request.node.callspec.params["_vm_image"]  # the matrix image (--vm-image)
    assert vm.os.arch == vm.run("uname -m", check=True).stdout.strip()
    assert vm.os.arch == by_name(vm.built_image.arch).uname  # what the image was built for runs
    assert vm.accel in ("kvm", "tcg")
    assert vm.console_log.exists()
    assert vm.os.id == "debian"
    assert vm.os.package_manager == "apt"
    assert vm.os.init == "systemd"


@pytest.mark.vm(needs=["saved_state"])  # a guest restored from a saved state; snapshot mode reverts in place
def test_restored_guests_console_log_starts_with_its_boot(vm):
    """Boot console kept with the state, a line marking the restore, then what the guest prints since."""
    vm.revert()  # certainly a guest restored from the clean state, on either backend
    vm.run("echo vmfx-after-restore > /dev/console", check=True)  # ttyS0, ttyAMA0: whichever the kernel's is
    deadline = time.monotonic() + 30
    while b"vmfx-after-restore" not in vm.console_log.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.1)
    text = vm.console_log.read_text(errors="replace")
    boot, mark, after = text.partition("[vmfixtures] ---- restored from saved state")
    assert mark, f"no restore marker in {vm.console_log}:\n{text[-2000:]}"
    assert "login:" in boot, f"the boot's console is not above the marker:\n{boot[-2000:]}"
    assert "vmfx-after-restore" in after and "vmfx-after-restore" not in boot


def test_factory_gives_distinct_guests(vm_factory):
    a = vm_factory()
    b = vm_factory(image="debian-12")
    a.run("echo a > /root/who", check=True)
    assert not b.run("test -e /root/who").ok
    assert (a.ssh_host, a.ssh_port) != (b.ssh_host, b.ssh_port)  # a forwarded port each, or an address each


@pytest.mark.vm(memory_mb=384)
def test_marker_memory(vm):
    kib = int(vm.run("awk '/MemTotal/ {print $2}' /proc/meminfo", check=True).stdout)
    assert 300 * 1024 < kib <= 384 * 1024
