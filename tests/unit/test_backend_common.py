"""What both backends share (backends/common.py) and the libvirt backend's name and XML rules: one copy
each, checked here once."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from pytest_vmfixtures.backends.base import SavedState
from pytest_vmfixtures.backends.common import NVRAM_NAME, find_ovmf, guest_disks, log_tail, opt, port_taken
from pytest_vmfixtures.backends.libvirt.names import CLIENT, owner, run_name
from pytest_vmfixtures.backends.libvirt.xmltext import attr, template_text, text
from pytest_vmfixtures.errors import GuestError
from pytest_vmfixtures.images.image import BuiltImage, GuestOS


def image_in(directory: Path, firmware: str, disk_format: str = "raw") -> BuiltImage:
    disk = directory / f"disk.{disk_format}"
    subprocess.run(["qemu-img", "create", "-q", "-f", disk_format, str(disk), "1M"], check=True, timeout=60)
    return BuiltImage(
        directory=directory, name="cloud", recipe_digest="r", disk=disk, disk_sha256="0" * 64, kernel=None,
        initrd=None, cmdline="", user="root", client_key=directory / "k", host_key="ssh-ed25519 AAAA",
        arch="x86_64", os=GuestOS("unknown", "", "unknown", "unknown"), agent=True, built_at=0.0,
        builder_version="byo-1", firmware=firmware, disk_format=disk_format,
    )


def backing_of(path: Path) -> tuple[str, str]:
    info = subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True, text=True,
                          check=True, timeout=60).stdout
    data = json.loads(info)
    return data["backing-filename"], data["backing-filename-format"]


def test_a_bios_guest_gets_an_overlay_over_its_image_in_the_images_format_and_no_nvram(tmp_path: Path) -> None:
    image = image_in(tmp_path, "bios")
    overlay, nvram = tmp_path / "overlay.qcow2", tmp_path / NVRAM_NAME
    assert guest_disks("qemu-img", image, image.disk, overlay, nvram, None) is None
    assert backing_of(overlay) == (str(image.disk), "raw")
    assert not nvram.exists()


def test_a_uefi_guest_gets_an_nvram_over_ovmfs_template_at_boot_and_over_the_states_at_restore(tmp_path: Path) -> None:
    _, variables = find_ovmf()  # scripts/bootstrap installs ovmf
    image = image_in(tmp_path, "uefi")
    nvram = tmp_path / "boot" / NVRAM_NAME
    nvram.parent.mkdir()
    assert guest_disks("qemu-img", image, image.disk, nvram.parent / "o.qcow2", nvram, None) == nvram
    assert backing_of(nvram) == (str(variables), "raw")
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(state_dir / NVRAM_NAME), "1M"], check=True, timeout=60)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(state_dir / "disk.qcow2"), "1M"], check=True, timeout=60)
    state = SavedState(directory=state_dir, disk=state_dir / "disk.qcow2", memory=state_dir / "memory", key="k")
    restored = tmp_path / "restore" / NVRAM_NAME
    restored.parent.mkdir()
    overlay = restored.parent / "o.qcow2"
    assert guest_disks("qemu-img", image, state.disk, overlay, restored, state) == restored
    assert backing_of(restored) == (str(state_dir / NVRAM_NAME), "qcow2")
    assert backing_of(overlay) == (str(state.disk), "qcow2")  # a restore's backing is the state's qcow2 layer


def test_a_kernel_booted_image_never_gets_an_nvram(tmp_path: Path) -> None:
    image = replace(image_in(tmp_path, "uefi"), kernel=tmp_path / "vmlinuz")
    assert guest_disks("qemu-img", image, image.disk, tmp_path / "o.qcow2", tmp_path / NVRAM_NAME, None) is None


@pytest.mark.parametrize(("message", "taken"), [
    ("qemu-system-x86_64: -netdev user,id=net0,hostfwd=tcp:127.0.0.1:4022-:22: could not set up host forwarding rule", True),
    ("internal error: process exited while connecting to monitor: hostfwd: address in use", True),
    ("qemu-system-x86_64: -drive file=/x: Could not open '/x': No such file or directory", False),
])
def test_only_a_taken_forwarded_port_is_retried(message: str, taken: bool) -> None:
    assert port_taken(message) is taken


def test_commas_in_option_values_are_doubled() -> None:
    assert opt(Path("/cache/ci,x/disk")) == "/cache/ci,,x/disk"


def test_run_names_carry_the_session_and_this_machines_client_tag_and_read_back() -> None:
    name = run_name("4242-0123abcd", "debian-12-1")
    assert name == f"vmfx-4242-0123abcd-{CLIENT}-debian-12-1"
    assert owner(name) == "4242-0123abcd"
    assert owner(name, client="ffffffff" if CLIENT != "ffffffff" else "00000000") is None  # another machine's
    assert owner("vmfx-img-0123456789abcdef.qcow2") is None
    assert owner("someone-elses-domain") is None


def test_xml_values_are_escaped_for_attributes_and_for_text() -> None:
    assert attr("a'b\"c<d>&e") == "a&apos;b&quot;c&lt;d&gt;&amp;e"
    assert text("a'b\"c<d>&e") == "a'b\"c&lt;d&gt;&amp;e"


def test_a_missing_template_is_a_broken_installation(tmp_path: Path) -> None:
    with pytest.raises(GuestError, match=r"template .*gone.xml is missing \(broken installation\)"):
        template_text(tmp_path / "gone.xml")


def test_a_log_tail_is_its_last_lines_on_one_line_and_empty_when_there_is_no_log(tmp_path: Path) -> None:
    log = tmp_path / "qemu.log"
    log.write_text("first\nsecond\nthird\n\n")
    assert log_tail(log, 2) == "second | third"
    assert log_tail(tmp_path / "gone.log") == ""
