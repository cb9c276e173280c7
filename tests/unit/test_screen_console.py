"""What the built-in images show on their screen: the kernel console (command line) and a login prompt."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from disk_images import built_in_image

from pytest_vmfixtures.backends.common import KERNEL_ARGS, kernel_args_key, kernel_command_line
from pytest_vmfixtures.instance import login_prompts, screen_login


def test_the_screen_console_comes_first_so_the_serial_port_stays_dev_console() -> None:
    line = kernel_command_line("root=/dev/vda console=ttyS0 quiet", vga=True)
    consoles = [word for word in line.split() if word.startswith("console=")]
    assert consoles == ["console=tty0", "console=ttyS0"]
    assert line.endswith(KERNEL_ARGS)


def test_machines_without_a_display_get_no_screen_console() -> None:
    assert "tty0" not in kernel_command_line("root=/dev/vda console=ttyAMA0", vga=False)


def test_saved_states_of_display_machines_change_key_with_the_screen_console() -> None:
    assert kernel_args_key(vga=True) != kernel_args_key(vga=False) == KERNEL_ARGS


def test_a_login_prompt_goes_on_built_in_x86_images_only() -> None:
    image = built_in_image()
    assert "agetty" in screen_login(image) and "tty1" in screen_login(image)
    assert screen_login(replace(image, arch="aarch64")) == ""  # no display to show it on
    cloud = replace(image, kernel=None, initrd=None, firmware="uefi", seed=Path("/cache/seeds/s/seed.iso"))
    assert screen_login(cloud) == ""  # a cloud image has its own gettys


def test_a_serial_getty_that_timed_out_at_boot_is_started_before_the_save() -> None:
    """Under load udev can announce the serial port after systemd gave up on it; the saved state gets its getty."""
    arm = replace(built_in_image(), arch="aarch64")
    cloud = replace(arm, kernel=None, initrd=None, firmware="uefi", seed=Path("/cache/seeds/s/seed.iso"))
    for image in (built_in_image(), arm, cloud):
        command = login_prompts(image)
        assert "--failed" in command and "'serial-getty@*'" in command and "systemctl start" in command
    assert login_prompts(built_in_image()).startswith(screen_login(built_in_image()))
