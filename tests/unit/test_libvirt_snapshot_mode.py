"""The libvirt backend's snapshot mode without a hypervisor: the mode's option, its domain XML, its seam."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from xml.etree import ElementTree

import pytest
from test_libvirt_domain import FILES, LOCAL, built_in_image, cloud_image, qemu_args

from pytest_vmfixtures.accel import AccelChoice
from pytest_vmfixtures.backends.base import MachineConfig
from pytest_vmfixtures.backends.libvirt.domain import domain_xml
from pytest_vmfixtures.backends.libvirt.snapshot import non_qemu_domain_xml
from pytest_vmfixtures.backends.libvirt.uris import NON_QEMU_SCHEMES, is_qemu_uri
from pytest_vmfixtures.errors import ImageError
from pytest_vmfixtures.images.image import BuiltImage
from pytest_vmfixtures.options import OptionError, parse_libvirt_mode

# -- the option -----------------------------------------------------------------


@pytest.mark.parametrize("uri", ["qemu:///system", "qemu:///session", "qemu+ssh://hv1/system",
                                 "qemu:///system?socket=/run/x/libvirt-sock", "QEMU+tcp://hv2/system"])
def test_qemu_uris_default_to_saved_state(uri: str) -> None:
    assert is_qemu_uri(uri)
    assert parse_libvirt_mode(None, [uri]) == "saved-state"
    assert parse_libvirt_mode("", [uri]) == "saved-state"
    assert parse_libvirt_mode("snapshot", [uri]) == "snapshot"


@pytest.mark.parametrize("uri", ["esx://esx1/?no_verify=1", "vpx://vc1/dc1/cluster1/esx1", "hyperv://hv3",
                                 "vbox:///session", "vmwarews:///session", "vmwareplayer:///session",
                                 "vmwarefusion:///session", "test:///default", "esx+https://esx2/", "gsx://gsx1/"])
def test_other_drivers_always_use_snapshot_mode(uri: str) -> None:
    assert not is_qemu_uri(uri)
    assert parse_libvirt_mode(None, ["qemu:///system", uri]) == "snapshot"
    assert parse_libvirt_mode("snapshot", [uri]) == "snapshot"
    with pytest.raises(OptionError, match=r"^--vm-libvirt-mode saved-state needs libvirt's QEMU driver, but .* is "
                                          r"not one; use --vm-libvirt-mode snapshot \(or leave it unset\)$"):
        parse_libvirt_mode("saved-state", ["qemu:///system", uri])


def test_every_listed_driver_is_a_non_qemu_scheme() -> None:
    assert set(NON_QEMU_SCHEMES) == {"esx", "vpx", "gsx", "hyperv", "vbox", "vmwarews", "vmwareplayer", "vmwarefusion", "test"}


def test_every_scheme_a_portable_driver_takes_goes_through_snapshot_mode() -> None:
    """A scheme the driver table knows but the option does not would default to saved-state mode and be refused."""
    from pytest_vmfixtures.backends.libvirt.drivers import DRIVERS

    schemes = {scheme.partition("+")[0] for driver in DRIVERS if driver.family != "qemu" for scheme in driver.schemes}
    assert schemes <= set(NON_QEMU_SCHEMES), sorted(schemes - set(NON_QEMU_SCHEMES))


@pytest.mark.parametrize("value", ["snapshots", "Snapshot", "savedstate", "saved_state"])
def test_a_bad_mode_is_one_line_naming_the_choices(value: str) -> None:
    with pytest.raises(OptionError) as info:
        parse_libvirt_mode(value, ["qemu:///system"])
    assert str(info.value) == f"--vm-libvirt-mode {value!r} is not one of saved-state, snapshot"


# -- the QEMU driver's domain in snapshot mode -------------------------------------

MAC = "52:54:00:12:34:56"


def render_snapshot(image: BuiltImage) -> str:
    paths: dict[str, object] = {"kernel": image.kernel, "initrd": image.initrd, "overlay": FILES / "overlay.qcow2",
                                "console": FILES / "console.log", "seed": image.seed}
    if image.firmware == "uefi":
        paths.update(ovmf_code=Path("/usr/share/OVMF/OVMF_CODE_4M.fd"), nvram=FILES / "nvram.qcow2")
    return domain_xml(AccelChoice("tcg", ""), image, MachineConfig("debian-12"),
                      "vmfx-1-0123abcd-89abcdef-guest-1", LOCAL, paths, 22, False, network="vmfx-nat", mac=MAC)


def test_the_guest_sits_on_the_libvirt_network_with_no_port_forward_and_no_monitor_tricks() -> None:
    root = ElementTree.fromstring(render_snapshot(built_in_image()))
    [interface] = root.findall("devices/interface")
    assert interface.get("type") == "network"
    source, mac, model = interface.find("source"), interface.find("mac"), interface.find("model")
    assert source is not None and source.get("network") == "vmfx-nat"
    assert mac is not None and mac.get("address") == MAC
    assert model is not None and model.get("type") == "virtio"
    assert qemu_args(root) == []  # no user-mode netdev, no hostfwd, no -incoming
    serial = root.find("devices/serial/source")
    assert serial is not None and serial.get("append") == "on"  # a revert keeps the log and marks itself in it


def test_the_saved_state_domain_is_unchanged() -> None:
    """Saved-state mode's XML keeps QEMU's user-mode network with the forwarded port, and no libvirt NIC."""
    paths: dict[str, object] = {"kernel": "/k", "initrd": "/i", "overlay": FILES / "overlay.qcow2",
                                "console": FILES / "console.log", "seed": None}
    root = ElementTree.fromstring(domain_xml(AccelChoice("tcg", ""), built_in_image(), MachineConfig("debian-12"),
                                             "vmfx-1-0123abcd-89abcdef-guest-1", LOCAL, paths, 2222, False))
    assert root.find("devices/interface") is None
    args = qemu_args(root)
    assert args[:2] == ["-netdev", "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22"]
    assert args[2] == "-device" and args[3].startswith("virtio-net-pci,netdev=net0,mac=52:54:00:")


@pytest.mark.skipif(shutil.which("virt-xml-validate") is None or shutil.which("xmllint") is None,
                    reason="needs virt-xml-validate (libvirt-clients) and xmllint (libxml2-utils)")
@pytest.mark.parametrize("image", [built_in_image(), cloud_image("bios"), cloud_image("uefi")],
                         ids=["built-in", "bios", "uefi"])
def test_the_snapshot_mode_domain_xml_is_valid_for_libvirt(image: BuiltImage, tmp_path: Path) -> None:
    xml = tmp_path / "domain.xml"
    xml.write_text(render_snapshot(image))
    result = subprocess.run(["virt-xml-validate", str(xml), "domain"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr + result.stdout


def test_other_drivers_get_their_familys_template_and_refuse_a_kernel_booted_image() -> None:
    with pytest.raises(ImageError, match=r"boots by direct kernel load, which only QEMU does"):
        non_qemu_domain_xml("esx://esx1/", built_in_image(), MachineConfig("debian-12"), "/d.vmdk", "vmfx-x",
                            mac="52:54:00:00:00:01", network="VM Network")
    xml = non_qemu_domain_xml("esx://esx1/", cloud_image("bios"), MachineConfig("debian-12", memory_mb=768), "[ds1] d.vmdk",
                              "vmfx-x", mac="52:54:00:00:00:01", network="VM Network")
    assert "type='vmware'" in xml and "[ds1] d.vmdk" in xml and "52:54:00:00:00:01" in xml and "VM Network" in xml
