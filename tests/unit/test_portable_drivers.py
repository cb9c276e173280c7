"""The portable path's drivers: which URI is which, what the installed libvirt has, and each family's
domain XML, checked element by element, against libvirt's schema, and (VMware) through libvirt's own
VMX converter."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from xml.etree import ElementTree

import pytest

from pytest_vmfixtures.backends.base import ALL_CAPABILITIES
from pytest_vmfixtures.backends.libvirt.drivers import (
    DRIVERS,
    TEMPLATES,
    compiled_in,
    driver_for,
    portable_domain_xml,
    require_firmware_boot,
)
from pytest_vmfixtures.errors import GuestError, ImageError
from pytest_vmfixtures.images.image import BuiltImage, GuestOS

DISKS = {"qemu": "/var/lib/libvirt/images/vmfx/disk.qcow2", "esx": "[datastore1] vmfx-guest/disk.vmdk",
         "vmware": "/home/ci/vmware/vmfx-guest/disk.vmdk", "vbox": "/home/ci/vbox/vmfx-guest/disk.vdi",
         "hyperv": "C:\\vmfx\\vmfx-guest\\disk.vhdx", "test": "/cache/converted/0123-raw/disk.raw"}
NETWORKS = {"qemu": "vmfx-nat", "esx": "VM Network", "vmware": "vmnet8", "vbox": "vboxnet0",
            "hyperv": "Default Switch", "test": "default"}
MAC = "00:50:56:12:34:56"


def render(family: str, firmware: str = "bios", **extra: object) -> str:
    driver = next(d for d in DRIVERS if d.family == family)
    return portable_domain_xml(driver, name="vmfx-guest", memory_mb=512, cpus=2, disk=DISKS[family], mac=MAC,
                               network=NETWORKS[family], firmware=firmware, **extra)


CASES = [(d.family, fw, seed) for d in DRIVERS if d.template for fw in d.firmwares for seed in (False, True)]
IDS = [f"{family}-{fw}{'-seed' if seed else ''}" for family, fw, seed in CASES]


def _validator_works() -> bool:
    return shutil.which("virt-xml-validate") is not None and shutil.which("xmllint") is not None


@pytest.mark.skipif(not _validator_works(), reason="needs virt-xml-validate (libvirt-clients) and xmllint (libxml2-utils)")
@pytest.mark.parametrize(("family", "firmware", "seed"), CASES, ids=IDS)
def test_every_drivers_domain_xml_passes_libvirts_schema(family: str, firmware: str, seed: bool, tmp_path: Path) -> None:
    xml = tmp_path / "domain.xml"
    xml.write_text(render(family, firmware, **({"seed": "/seeds/seed.iso"} if seed else {})))
    result = subprocess.run(["virt-xml-validate", str(xml), "domain"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr + result.stdout


@pytest.mark.parametrize(("family", "firmware", "seed"), CASES, ids=IDS)
def test_one_firmware_booted_disk_one_nic_with_its_mac_and_a_console(family: str, firmware: str, seed: bool) -> None:
    root = ElementTree.fromstring(render(family, firmware, **({"seed": "/seeds/seed.iso"} if seed else {})))
    assert root.get("type") == {"esx": "vmware"}.get(family, family)
    assert root.find("os/kernel") is None and root.find("os/cmdline") is None
    assert (root.find("os").get("firmware") == "efi") == (firmware == "uefi")  # type: ignore[union-attr]
    disks = root.findall("devices/disk")
    assert [d.get("device") for d in disks] == (["disk", "cdrom"] if seed else ["disk"])
    assert disks[0].find("source").get("file") == DISKS[family]  # type: ignore[union-attr]
    if seed:
        assert disks[1].find("readonly") is not None and disks[1].find("boot") is None
    nics = root.findall("devices/interface")
    assert len(nics) == 1
    assert nics[0].find("mac").get("address") == MAC  # type: ignore[union-attr]
    source = nics[0].find("source")
    assert source is not None and NETWORKS[family] in (source.get("network"), source.get("bridge"))
    assert len(root.findall("devices/serial")) == 1
    assert not any(el.tag.startswith("{") for el in root.iter())  # nothing outside libvirt's own schema


def test_one_template_per_driver_and_none_for_qemus_which_takes_domain_xml() -> None:
    used = [d.template for d in DRIVERS if d.template]
    assert sorted(p.name for p in TEMPLATES.glob("*.xml")) == sorted(set(used))  # no template nobody renders
    assert [d.family for d in DRIVERS if not d.template] == ["qemu"]
    with pytest.raises(GuestError, match=r"^libvirt's qemu driver has no template under templates/: its guests' XML "
                                         r"is domain.xml \(domain.py\)$"):
        render("qemu")


def test_consoles_go_where_each_hypervisor_keeps_them() -> None:
    def serial(family: str) -> tuple[str | None, str | None, str | None]:
        element = ElementTree.fromstring(render(family)).find("devices/serial")
        assert element is not None
        source = element.find("source")
        return element.get("type"), None if source is None else source.get("path"), element.find("target").get("port")  # type: ignore[union-attr]

    assert serial("esx") == ("file", "[datastore1] vmfx-guest/vmfx-guest.console.log", "0")
    assert serial("vmware") == ("file", "/home/ci/vmware/vmfx-guest/vmfx-guest.console.log", "0")
    assert serial("vbox") == ("file", "/home/ci/vbox/vmfx-guest/vmfx-guest.console.log", "0")
    assert serial("hyperv") == ("pipe", "\\\\.\\pipe\\vmfx-guest-console", "1")  # Hyper-V's COM ports start at 1
    assert ElementTree.fromstring(render("vbox", console="/tmp/c.log")).find(
        "devices/serial/source").get("path") == "/tmp/c.log"  # type: ignore[union-attr]


def test_values_are_escaped() -> None:
    driver = driver_for("test:///default")
    xml = portable_domain_xml(driver, name="a'b<c>&\"d", memory_mb=64, cpus=1, disk="/x/it's.raw", mac=MAC,
                              network="default", firmware="bios")
    root = ElementTree.fromstring(xml)
    assert root.findtext("name") == "a'b<c>&\"d"
    assert root.find("devices/disk/source").get("file") == "/x/it's.raw"  # type: ignore[union-attr]


def test_bad_values_are_refused() -> None:
    with pytest.raises(GuestError, match=r"^the vbox template boots bios, not 'uefi'$"):
        render("vbox", "uefi")
    with pytest.raises(GuestError, match="VMware wants memory in multiples of 4 MiB, not 514"):
        portable_domain_xml(driver_for("esx://h/"), name="g", memory_mb=514, cpus=1, disk="[d] g/d.vmdk", mac=MAC,
                            network="VM Network", firmware="bios")
    with pytest.raises(TypeError, match=r"unknown values \['kernel'\]"):
        render("test", kernel="/boot/vmlinuz")


@pytest.mark.parametrize(("uri", "family", "disk_format"), [
    ("qemu:///system", "qemu", "qcow2"), ("qemu+ssh://ci@hv1/system", "qemu", "qcow2"),
    ("esx://esx1.example.org/?no_verify=1", "esx", "vmdk"), ("vpx://vc.example.org/dc1/cluster1/esx1", "esx", "vmdk"),
    ("gsx://gsx.example.org/", "esx", "vmdk"), ("vmwarews:///session", "vmware", "vmdk"),
    ("vmwareplayer:///session", "vmware", "vmdk"), ("vmwarefusion+ssh://mac1/session", "vmware", "vmdk"),
    ("vbox:///session", "vbox", "vdi"), ("vbox+ssh://ci@desk1/session", "vbox", "vdi"),
    ("hyperv://hv.example.org/?transport=http", "hyperv", "vhdx"), ("test:///default", "test", "raw"),
])
def test_each_uri_finds_its_driver(uri: str, family: str, disk_format: str) -> None:
    driver = driver_for(uri)
    assert (driver.family, driver.disk_format) == (family, disk_format)
    assert driver.capabilities <= ALL_CAPABILITIES
    assert (TEMPLATES / driver.template).is_file() if family != "qemu" else driver.template == ""
    assert "\n" not in driver.describe()


def test_what_each_driver_can_and_cannot_do() -> None:
    by_family = {d.family: d for d in DRIVERS}
    assert {f for f, d in by_family.items() if not d.snapshots} == {"vmware", "hyperv"}  # no snapshot API in libvirt
    assert by_family["qemu"].capabilities == {"agent", "console"}
    assert {f for f, d in by_family.items() if "uefi" in d.firmwares} == {"test"}
    assert all("qmp" not in d.capabilities and "saved_state" not in d.capabilities for d in DRIVERS)
    assert by_family["esx"].template == by_family["vmware"].template  # one VMX converter, one template


def test_an_unknown_scheme_is_one_line_saying_what_to_do() -> None:
    with pytest.raises(GuestError) as caught:
        driver_for("xen:///system")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("libvirt URI 'xen:///system': no driver the portable path knows has the scheme 'xen'")
    assert "give a URI such as esx://host/ or vbox:///session" in message


def built_in_image(firmware: str = "") -> BuiltImage:
    directory = Path("/cache/images/tiny-0123")
    return BuiltImage(
        directory=directory, name="tiny", recipe_digest="r", disk=directory / "disk.qcow2", disk_sha256="0" * 64,
        kernel=directory / "vmlinuz" if not firmware else None, initrd=None, cmdline="", user="root",
        client_key=directory / "key", host_key="", arch="x86_64", os=GuestOS("tiny", "1", "busybox", "none"),
        agent=True, built_at=0.0, builder_version="1", firmware=firmware,
    )


def test_an_image_booting_its_kernel_directly_is_refused_in_one_line() -> None:
    with pytest.raises(ImageError) as caught:
        require_firmware_boot(built_in_image(), driver_for("vbox:///session"))
    assert "\n" not in str(caught.value)
    assert "tiny boots by direct kernel load, which only QEMU does; the portable path (VirtualBox)" in str(caught.value)
    with pytest.raises(ImageError, match="through uefi firmware, which the portable path does not run on Microsoft "
                                         "Hyper-V [(]it runs bios[)]"):
        require_firmware_boot(built_in_image("uefi"), driver_for("hyperv://h/"))
    with pytest.raises(ImageError, match="does not run on QEMU/KVM"):  # no internal snapshot with UEFI (libvirt 9.0)
        require_firmware_boot(built_in_image("uefi"), driver_for("qemu:///system"))
    require_firmware_boot(built_in_image("uefi"), driver_for("test:///default"))
    require_firmware_boot(built_in_image("bios"), driver_for("esx://h/"))


libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed: pip install -e '.[libvirt]'")


@pytest.fixture(autouse=True)
def _quiet_libvirt() -> None:
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def test_the_drivers_this_libvirt_has_are_found() -> None:
    assert compiled_in("test:///default") is None
    assert compiled_in("esx://esx1.example.org/") is None  # client-side, in libvirt0; nothing contacted
    assert compiled_in("vpx://vc.example.org/dc1/esx1") is None


def test_a_driver_this_libvirt_lacks_gets_a_one_line_reason() -> None:
    """Debian 12's libvirt is built without Hyper-V; its VirtualBox driver is a package of its own."""
    hyperv = compiled_in("hyperv://hv.example.org/")
    if hyperv is not None:
        assert "\n" not in hyperv
        assert hyperv.startswith("this libvirt has no hyperv driver")
    vbox = compiled_in("vbox:///session")
    if vbox is not None:
        assert vbox == ("this libvirt has no vbox driver: install Debian's libvirt-daemon-driver-vbox "
                        "(or use a libvirt built with it) to reach vbox:// hosts")
    if Path("/etc/debian_version").read_text().startswith("12") and libvirt.getVersion() // 1000000 == 9:
        assert hyperv is not None  # so the branches above ran: neither assertion is conditional on this host
        # The vbox driver is a package of its own (libvirt-daemon-driver-vbox): absent, the message above is given.
        assert (vbox is None) == bool(list(Path("/usr/lib").glob("*/libvirt/connection-driver/libvirt_driver_vbox.so")))


@pytest.mark.skipif(shutil.which("apt-cache") is None, reason="not a Debian host")
def test_the_packages_named_exist_in_this_distribution() -> None:
    for package in sorted({d.provider for d in DRIVERS if d.provider}):
        shown = subprocess.run(["apt-cache", "show", package], capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0 and f"Package: {package}" in shown.stdout, package


# Stand-ins for VMware Workstation's programs (VMware cannot be installed here): just enough for
# libvirt's VMware driver to open, so that its real VMX converter reads the template.
VMWARE_STANDIN = '#!/bin/sh\necho "VMware Workstation 16.2.0 build-18760230"\n'
VMRUN_STANDIN = "#!/bin/sh\nexit 0\n"


def test_libvirts_vmx_converter_takes_the_vmware_template(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("vmware", VMWARE_STANDIN), ("vmrun", VMRUN_STANDIN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    guest = tmp_path / "vmfx-guest"
    guest.mkdir()
    disk = guest / "disk.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(disk), "16M"], check=True, timeout=60)
    driver = driver_for("vmwarews:///session")
    conn = libvirt.open("vmwarews:///session")
    try:
        domain = conn.defineXML(portable_domain_xml(
            driver, name="vmfx-guest", memory_mb=512, cpus=2, disk=str(disk), mac=MAC, network="vmnet8",
            firmware="bios", seed=str(guest / "seed.iso")))
        try:
            vmx = dict(re.findall(r'^(\S+) = "(.*)"$', (guest / "vmfx-guest.vmx").read_text(), re.MULTILINE))
        finally:
            domain.undefine()
        # What libvirt's real VMX converter made of it.
        assert vmx["memsize"] == "512" and vmx["numvcpus"] == "2"
        assert (vmx["scsi0.virtualDev"], vmx["scsi0:0.fileName"]) == ("lsilogic", str(disk))
        assert (vmx["ide0:0.deviceType"], vmx["ide0:0.fileName"]) == ("cdrom-image", str(guest / "seed.iso"))
        assert (vmx["ethernet0.virtualDev"], vmx["ethernet0.connectionType"], vmx["ethernet0.vnet"]) == (
            "e1000", "custom", "vmnet8")
        assert (vmx["ethernet0.addressType"], vmx["ethernet0.address"]) == ("static", MAC)
        assert (vmx["serial0.fileType"], vmx["serial0.fileName"]) == ("file", str(guest / "vmfx-guest.console.log"))
        # UEFI: the converter refuses firmware autoselection, which is why the VMware template is BIOS only.
        xml = portable_domain_xml(driver_for("test:///default"), name="vmfx-efi", memory_mb=512, cpus=1,
                                  disk=str(disk), mac=MAC, network="vmnet8", firmware="uefi")
        with pytest.raises(libvirt.libvirtError, match="firmware auto selection not implemented for this driver"):
            conn.defineXML(xml.replace("type='test'", "type='vmware'", 1))
    finally:
        conn.close()
