"""instance.diagnose_console / consolelog.console_tail: what a boot log most likely says, in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_vmfixtures.consolelog import console_tail
from pytest_vmfixtures.instance import diagnose_console

PANIC_LOG = """\
[    0.000000] Linux version 6.1.0-27-cloud-amd64
[    1.234567] VFS: Cannot open root device "vda" or unknown-block(0,0): error -6
[    1.234999] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)
[    1.235000] CPU: 0 PID: 1 Comm: swapper/0 Not tainted
"""

NO_ROOT_LOG = """\
Loading, please wait...
Begin: Waiting for root file system ... done.
Gave up waiting for root file system device.  Common problems:
 - Boot args (cat /proc/cmdline)
ALERT!  /dev/vda does not exist.  Dropping to a shell!
(initramfs)
"""

LOGIN_NO_SSH_LOG = """\
[  OK  ] Reached target multi-user.target - Multi-User System.

Debian GNU/Linux 12 debian-12 ttyS0

debian-12 login:
"""

EARLY_USERSPACE_LOG = """\
[    0.000000] Linux version 6.1.0-27-cloud-amd64
[    2.000000] Run /init as init process
Begin: Loading essential drivers ... done.
"""

SSHD_STARTED_LOG = """\
         Starting ssh.service - OpenBSD Secure Shell server...
[  OK  ] Started ssh.service - OpenBSD Secure Shell server.
"""


def test_kernel_panic_is_named_with_its_reason() -> None:
    diagnosis = diagnose_console(PANIC_LOG, "kvm")
    assert diagnosis == "kernel panic: not syncing: VFS: Unable to mount root fs on unknown-block(0,0)"
    assert "\n" not in diagnosis


def test_panic_wins_over_everything_else() -> None:
    assert diagnose_console(LOGIN_NO_SSH_LOG + PANIC_LOG, "tcg").startswith("kernel panic: ")


@pytest.mark.parametrize("text", ["", "\n\n", "   \r\n"])
def test_empty_log_means_the_kernel_did_not_start(text: str) -> None:
    diagnosis = diagnose_console(text, "tcg")
    assert diagnosis.startswith("no console output at all")
    assert "accel" in diagnosis


@pytest.mark.parametrize("text", [NO_ROOT_LOG, "mount: UNABLE TO MOUNT ROOT fs\n"])
def test_root_not_found(text: str) -> None:
    assert diagnose_console(text, "kvm") == "the root disk was not found: the initrd lacks virtio_blk or root= is wrong"


def test_reached_login_but_no_ssh() -> None:
    diagnosis = diagnose_console(LOGIN_NO_SSH_LOG, "kvm")
    assert diagnosis.startswith("the system booted but SSH did not answer")
    assert "DHCP" in diagnosis


def test_userspace_never_reached_sshd_under_tcg_suggests_more_time() -> None:
    diagnosis = diagnose_console(EARLY_USERSPACE_LOG, "tcg")
    assert "never reached sshd" in diagnosis
    assert "--vm-boot-timeout" in diagnosis


def test_userspace_never_reached_sshd_under_kvm_is_not_blamed_on_speed() -> None:
    assert diagnose_console(EARLY_USERSPACE_LOG, "kvm") == "userspace never reached sshd"


def test_sshd_started_but_unreachable() -> None:
    assert diagnose_console(SSHD_STARTED_LOG, "kvm") == "sshd did not become reachable before the deadline"


@pytest.mark.parametrize("text", [PANIC_LOG, "", NO_ROOT_LOG, LOGIN_NO_SSH_LOG, EARLY_USERSPACE_LOG, SSHD_STARTED_LOG])
@pytest.mark.parametrize("accel", ["kvm", "tcg"])
def test_every_diagnosis_is_one_line(text: str, accel: str) -> None:
    diagnosis = diagnose_console(text, accel)
    assert diagnosis and "\n" not in diagnosis


def test_console_tail_keeps_the_last_lines_without_carriage_returns(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"".join(f"line {i}\r\n".encode() for i in range(100)))
    assert console_tail(log, 3) == "line 97\nline 98\nline 99"


def test_console_tail_survives_binary_junk(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"\x1b[0m\xff\xfe garbage\nlogin:\n")
    assert console_tail(log).splitlines()[-1] == "login:"


def test_console_tail_reads_only_the_end_of_a_huge_log(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"x" * (1 << 20) + b"\nthe end\n")
    tail = console_tail(log, 400)
    assert tail.endswith("the end")
    assert len(tail) <= 64 * 1024


def test_console_tail_of_a_missing_log(tmp_path: Path) -> None:
    assert console_tail(tmp_path / "absent.log") == "(no console log)"


# -- your own images: started by their own bootloader, set up by cloud-init ----------------------
CLOUD_INIT_LOG = LOGIN_NO_SSH_LOG.replace(
    "\nDebian", "\n[   72.5] cloud-init[240]: Cloud-init v. 22.4.2 running 'init-local'\nDebian"
)


def test_your_image_with_nothing_on_the_console_points_at_the_disk_and_firmware() -> None:
    diagnosis = diagnose_console("", "kvm", seeded=True)
    assert "firmware found nothing to boot" in diagnosis and "firmware=" in diagnosis


def test_your_image_that_never_ran_cloud_init_is_told_so() -> None:
    diagnosis = diagnose_console(LOGIN_NO_SSH_LOG, "tcg", seeded=True)
    assert diagnosis.startswith("cloud-init never showed on the console")
    assert "docs/cloud-images.md" in diagnosis


def test_your_image_that_ran_cloud_init_gets_the_usual_diagnosis() -> None:
    assert diagnose_console(CLOUD_INIT_LOG, "kvm", seeded=True) == diagnose_console(LOGIN_NO_SSH_LOG, "kvm")
    assert diagnose_console(PANIC_LOG, "kvm", seeded=True).startswith("kernel panic: ")
