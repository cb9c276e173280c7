"""The libvirt domain XML: a built-in image's direct kernel boot, and your own cloud image booted through
SeaBIOS or OVMF with its seed; checked element by element, and against libvirt's schema when
virt-xml-validate can run here."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from xml.etree import ElementTree

import pytest
from disk_images import built_in_image

from pytest_vmfixtures.accel import AccelChoice
from pytest_vmfixtures.backends.base import MachineConfig
from pytest_vmfixtures.backends.libvirt.connection import Host
from pytest_vmfixtures.backends.libvirt.domain import domain_xml
from pytest_vmfixtures.backends.libvirt.placement import hosts_for
from pytest_vmfixtures.channels.runner import PORT_NAME as RUNNER_PORT
from pytest_vmfixtures.errors import ImageError
from pytest_vmfixtures.images.image import BuiltImage, GuestOS

QEMU_NS = "{http://libvirt.org/schemas/domain/qemu/1.0}"
LOCAL = Host("qemu:///system", None, "9.0.0", "7.2.0")
URL = "http://127.0.0.1:8080/debian-12-uefi-cloud.qcow2"
SHA256 = "3b" * 32
FILES = Path("/run/vmfx/guest,1")  # a comma, which QEMU's option syntax needs written twice
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")


def cloud_image(firmware: str, agent: bool = True) -> BuiltImage:
    seeds = Path("/cache/seeds/3b3b-vmfix-1")
    return BuiltImage(
        directory=seeds, name="debian-12-uefi-cloud-3b3b3b3b", recipe_digest="r", disk=Path("/cache/downloads/d.qcow2"),
        disk_sha256=SHA256, kernel=None, initrd=None, cmdline="", user="vmfix", client_key=seeds / "client_key",
        host_key="ssh-ed25519 AAAA", arch="x86_64", os=GuestOS("unknown", "", "unknown", "unknown"), agent=agent,
        built_at=0.0, builder_version="byo-1", firmware=firmware, seed=seeds / "seed.iso",
    )


def render(image: BuiltImage, incoming: bool = False, accel: str = "tcg", runner: Path | None = None) -> str:
    paths: dict[str, object] = {"kernel": image.kernel, "initrd": image.initrd, "overlay": FILES / "overlay.qcow2",
                                "console": FILES / "console.log", "seed": image.seed}
    if runner is not None:
        paths["runner"] = runner
    if image.firmware == "uefi":
        paths.update(ovmf_code=OVMF_CODE, nvram=FILES / "nvram.qcow2")
    config = MachineConfig(URL, sha256=SHA256) if image.kernel is None else MachineConfig("debian-12")
    return domain_xml(AccelChoice(accel, ""), image, config, "vmfx-1-0123abcd-89abcdef-guest-1", LOCAL, paths, 2222,
                      incoming)


def qemu_args(root: ElementTree.Element) -> list[str]:
    return [str(arg.get("value")) for arg in root.iter(f"{QEMU_NS}arg")]


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_a_cloud_guest_boots_its_disk_with_the_seed_as_a_read_only_cd(firmware: str) -> None:
    root = ElementTree.fromstring(render(cloud_image(firmware)))
    os_element = root.find("os")
    assert os_element is not None
    assert [child.tag for child in os_element] == ["type"]  # no kernel, no initrd: firmware reads the disk
    disks = root.findall("devices/disk")
    assert [d.get("device") for d in disks] == ["disk", "cdrom"]
    system, seed = disks
    assert system.find("boot") is not None and system.find("boot").get("order") == "1"  # type: ignore[union-attr]
    assert seed.find("boot") is None  # the seed is data, never booted from
    assert seed.find("readonly") is not None
    assert seed.find("source").get("file") == "/cache/seeds/3b3b-vmfix-1/seed.iso"  # type: ignore[union-attr]
    assert seed.find("target").get("bus") == "scsi"  # type: ignore[union-attr]
    assert [c.get("model") for c in root.findall("devices/controller[@type='scsi']")] == ["virtio-scsi"]


def test_a_bios_cloud_guest_runs_the_default_seabios() -> None:
    root = ElementTree.fromstring(render(cloud_image("bios")))
    assert not [arg for arg in qemu_args(root) if "pflash" in arg]
    assert root.find("os/loader") is None and root.find("os/nvram") is None


def test_a_uefi_cloud_guest_gets_ovmf_read_only_and_an_nvram_of_its_own() -> None:
    args = qemu_args(ElementTree.fromstring(render(cloud_image("uefi"))))
    drives = [args[i + 1] for i, arg in enumerate(args) if arg == "-drive"]
    assert drives == [
        f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
        # qcow2, so it is saved with the state and savevm (vm.snapshot) takes it along; the comma doubled
        "if=pflash,format=qcow2,unit=1,file=/run/vmfx/guest,,1/nvram.qcow2",
    ]


def test_a_cloud_guest_keeps_the_other_security_settings() -> None:
    root = ElementTree.fromstring(render(cloud_image("uefi")))
    netdev = next(arg for arg in qemu_args(root) if arg.startswith("user,"))
    assert "restrict=on" in netdev and "hostfwd=tcp:127.0.0.1:2222-:22" in netdev
    seclabel = root.find("seclabel")
    assert seclabel is not None and seclabel.get("relabel") == "no"
    assert root.find("devices/interface") is None and root.find("devices/graphics") is None


@pytest.mark.parametrize("agent", [True, False])
def test_the_agent_channel_is_there_when_the_image_has_the_agent(agent: bool) -> None:
    """Your own image's guests get vmfx-runner's port beside the agent's (on the same virtio-serial bus)."""
    root = ElementTree.fromstring(render(cloud_image("bios", agent=agent)))
    names = [t.get("name") for t in root.findall("devices/channel/target")]
    assert names == (["org.qemu.guest_agent.0", RUNNER_PORT] if agent else [])


@pytest.mark.parametrize("runner", [FILES / "runner", None])
def test_the_runner_port_is_on_a_socket_of_ours_where_one_is_named(runner: Path | None) -> None:
    """A local guest's runner socket is the plugin's file; elsewhere libvirt places it (the same device)."""
    root = ElementTree.fromstring(render(cloud_image("uefi"), runner=runner))
    channel = next(c for c in root.findall("devices/channel") if c.find("target").get("name") == RUNNER_PORT)  # type: ignore[union-attr]
    source = channel.find("source")
    assert channel.get("type") == "unix" and source is not None and source.get("mode") == "bind"
    assert source.get("path") == (str(runner) if runner is not None else None)


def test_a_built_in_image_gets_no_runner_port() -> None:
    """Built-in images' hardware (and so their saved states' keys) are as before: the agent's port alone."""
    root = ElementTree.fromstring(render(built_in_image()))
    assert [t.get("name") for t in root.findall("devices/channel/target")] == ["org.qemu.guest_agent.0"]


def test_the_hardware_is_the_same_at_boot_and_at_restore() -> None:
    """A saved state loads only into the same devices: a restore adds -incoming, nothing else."""
    boot, restore = (ElementTree.fromstring(render(cloud_image("uefi"), incoming)) for incoming in (False, True))

    def devices(root: ElementTree.Element) -> list[tuple[str | None, ...]]:
        return [(e.tag, e.get("type"), e.get("device"), e.get("model")) for e in root.iter() if e.tag != f"{QEMU_NS}arg"]

    assert devices(restore) == devices(boot)
    assert qemu_args(restore) == [*qemu_args(boot), "-incoming", "defer"]


def test_a_built_in_image_still_boots_its_kernel_directly() -> None:
    root = ElementTree.fromstring(render(built_in_image()))
    assert root.findtext("os/kernel") == "/cache/images/debian-12-0123/vmlinuz"
    assert root.findtext("os/initrd") == "/cache/images/debian-12-0123/initrd.img"
    assert root.findtext("os/cmdline", "").startswith("console=tty0 root=/dev/vda rw console=ttyS0 ")
    assert [d.get("device") for d in root.findall("devices/disk")] == ["disk"]
    assert root.find("devices/disk/boot") is None
    assert not [arg for arg in qemu_args(root) if "pflash" in arg]


def test_an_image_with_neither_kernel_nor_known_firmware_is_refused() -> None:
    with pytest.raises(ImageError, match=r"firmware '', not bios or uefi; delete /cache/seeds/3b3b-vmfix-1"):
        render(cloud_image(""))


def _validator_works() -> bool:
    return shutil.which("virt-xml-validate") is not None and shutil.which("xmllint") is not None


@pytest.mark.skipif(not _validator_works(), reason="needs virt-xml-validate (libvirt-clients) and xmllint (libxml2-utils)")
@pytest.mark.parametrize("image", [cloud_image("bios"), cloud_image("uefi"), built_in_image()],
                         ids=["bios", "uefi", "built-in"])
@pytest.mark.parametrize("incoming", [False, True], ids=["boot", "restore"])
@pytest.mark.parametrize("accel", ["tcg", "kvm"])
def test_the_domain_xml_is_valid_for_libvirt(image: BuiltImage, incoming: bool, accel: str, tmp_path: Path) -> None:
    xml = tmp_path / "domain.xml"
    xml.write_text(render(image, incoming, accel))
    result = subprocess.run(["virt-xml-validate", str(xml), "domain"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr + result.stdout


def test_cloud_images_go_only_to_hosts_that_share_this_machines_files() -> None:
    remote = Host("qemu+ssh://hv1/system", None, "9.0.0", "7.2.0", storage=object())  # type: ignore[arg-type]
    assert hosts_for(cloud_image("uefi"), [remote, LOCAL]) == [LOCAL]
    assert hosts_for(built_in_image(), [remote, LOCAL]) == [remote, LOCAL]
    with pytest.raises(ImageError, match=r"not on qemu\+ssh://hv1/system: add such a --vm-libvirt-uri, or use "
                                         r"--vm-backend qemu"):
        hosts_for(cloud_image("bios"), [remote])


def test_under_kvm_the_domain_is_a_kvm_one_with_the_hosts_cpu() -> None:
    """No guest runs under KVM in this project's CI (its hosts have none): the KVM domain is checked as XML."""
    kvm = ElementTree.fromstring(render(built_in_image(), accel="kvm"))
    tcg = ElementTree.fromstring(render(built_in_image(), accel="tcg"))
    assert (kvm.get("type"), tcg.get("type")) == ("kvm", "qemu")
    cpu = kvm.find("cpu")
    assert cpu is not None and cpu.get("mode") == "host-passthrough"
    assert kvm.find("features/tcg") is None and tcg.find("features/tcg") is not None


@pytest.mark.parametrize("image", [cloud_image("bios"), cloud_image("uefi"), built_in_image()],
                         ids=["bios", "uefi", "built-in"])
@pytest.mark.parametrize("incoming", [False, True], ids=["boot", "restore"])
def test_a_guest_that_reboots_itself_is_restarted_by_libvirt(image: BuiltImage, incoming: bool) -> None:
    """vm.reboot() reboots from inside the guest: libvirt must start the domain again, in both modes (scripts/test
    runs the reboot test itself through libvirt in the saved-state mode only: a guest boot is minutes there)."""
    root = ElementTree.fromstring(render(image, incoming))
    assert root.findtext("on_reboot") == "restart"
    assert root.findtext("on_poweroff") == "destroy"
