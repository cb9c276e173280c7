"""``vm.host``: testinfra's checks against a real guest, through the guest's own channel.

The tests come in file order: one wrecks the guest through ``vm.host``, the next proves testinfra
sees the clean guest the revert put behind the same fixture.
"""

from __future__ import annotations

from pytest_vmfixtures import GuestState


def test_packages_services_files_users_and_exit_codes(vm):
    host = vm.host
    assert host.package("openssh-server").is_installed
    assert not host.package("nginx").is_installed
    assert host.service("ssh").is_running
    assert host.service("ssh").is_enabled
    assert host.file("/etc/os-release").contains("bookworm")
    assert host.file("/etc/shadow").mode == 0o640
    assert host.user("root").uid == 0
    assert not host.user("nobody-here").exists
    assert host.run("exit 3").rc == 3
    assert host.run("echo %s", "a b;c").stdout == "a b;c\n"  # testinfra's argument quoting holds
    assert host.check_output("id -u") == "0"  # root, as vm.run is
    assert host.backend.get_connection_type() == "vmfixtures"


def test_host_commands_count_as_use_and_take_the_current_channel(vm):
    assert vm.state == GuestState.READY
    channel = vm.channel
    vm.host.run("true")
    assert vm.state == GuestState.DIRTY  # the guest will be reverted after this test
    assert vm.channel == channel
    boot_id = vm.run("cat /proc/sys/kernel/random/boot_id").stdout.strip()
    assert vm.host.file("/proc/sys/kernel/random/boot_id").content_string.strip() == boot_id


def test_destructive_test_through_host(vm):
    host = vm.host
    host.run("systemctl stop ssh && rm -f /etc/os-release /usr/lib/os-release && useradd -M wrecker && echo x > /root/left")
    assert not host.service("ssh").is_running
    assert host.user("wrecker").exists
    assert not host.file("/etc/os-release").exists


def test_after_the_revert_host_sees_the_clean_guest(vm):
    host = vm.host
    assert host.service("ssh").is_running
    assert not host.user("wrecker").exists
    assert host.file("/etc/os-release").exists
    assert not host.file("/root/left").exists


def test_the_host_follows_the_handle_across_a_revert_inside_the_test(vm):
    host = vm.host
    host.run("touch /root/before-revert")
    assert host.file("/root/before-revert").exists
    vm.revert()
    assert vm.host is host  # the same Host, now reaching the clean guest
    assert not host.file("/root/before-revert").exists
