"""The libvirt drivers the portable path knows: what each is, needs and gives, and its domain XML.

The portable path (the libvirt backend's snapshot mode) runs a guest through
nothing but libvirt's own API, so it works on every driver that can define a
domain from a disk: VMware ESXi and Workstation, VirtualBox, Hyper-V, libvirt's
test driver, and the QEMU driver too. One template per driver family: under
``templates/``, rendered here, for every family but QEMU's, whose guests are
described by the saved-state mode's ``domain.xml`` (domain.py) in both modes.
Which family a URI means comes from its scheme.

What differs between families, and why it is stated here rather than found out
at run time: the disk format the hypervisor reads, the firmware it can boot, the
capabilities a guest has (backends.base.CAPABILITIES) and whether libvirt's
driver has the snapshot API at all (its VMware Workstation and Hyper-V drivers
have none: a guest there cannot be reverted by a hypervisor snapshot).
"""

from __future__ import annotations

import re
import string
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from ...errors import GuestError, ImageError
from ...images.image import BuiltImage
from .calls import bounded, libvirt, require_libvirt
from .xmltext import attr, template_text

TEMPLATES = Path(__file__).with_name("templates")
FIRMWARES = ("bios", "uefi")
PROBE_TIMEOUT = 30.0
# A host name that never resolves (RFC 6761): a probe of a client-side driver contacts nobody.
PROBE_HOST = "vmfx-probe.invalid"
# Extra values a template may take besides the named parameters of portable_domain_xml.
EXTRA_KEYS = frozenset({"uuid", "seed", "console"})


@dataclass(frozen=True)
class Driver:
    """One libvirt driver family as the portable path uses it."""

    family: str  # "qemu", "esx", "vmware", "vbox", "hyperv", "test"
    schemes: tuple[str, ...]  # URI schemes, transports included ("qemu+ssh")
    disk_format: str  # the format its disks must be in
    capabilities: frozenset[str]  # what its guests have in snapshot mode (backends.base.CAPABILITIES)
    template: str  # a file under templates/; "" for QEMU's driver (domain.py's domain.xml)
    title: str = ""  # the hypervisor, for people
    firmwares: tuple[str, ...] = FIRMWARES  # what its template can boot
    snapshots: bool = True  # libvirt's driver has the snapshot API (create, revert, delete)
    provider: str = ""  # what gives this libvirt the driver: a Debian package, or "" if Debian has none

    def describe(self) -> str:
        caps = ", ".join(sorted(self.capabilities)) or "none"
        revert = "hypervisor snapshots" if self.snapshots else "no snapshot API in libvirt's driver"
        return (f"{self.title} (libvirt {self.family} driver, {self.disk_format} disks, "
                f"firmware {'/'.join(self.firmwares)}, {revert}, capabilities: {caps})")


def _with_transports(*names: str) -> tuple[str, ...]:
    """Schemes of a driver reached through libvirt's daemon, directly or over its remote transports."""
    transports = ("unix", "ssh", "libssh", "libssh2", "tcp", "tls", "ext")
    return tuple(s for name in names for s in (name, *(f"{name}+{t}" for t in transports)))


DRIVERS: tuple[Driver, ...] = (
    # Snapshot mode on QEMU's driver: the guest agent answers through libvirt (virDomainQemuAgentCommand);
    # the console goes to a file. No QMP: snapshot mode keeps to libvirt's API. No port forward: the guest
    # is reached at its address on the libvirt network. Its XML is domain.py's (no template here).
    # BIOS only: libvirt 9.0 refuses internal snapshots of a guest with pflash (UEFI) firmware.
    Driver("qemu", _with_transports("qemu"), "qcow2", frozenset({"agent", "console"}), "",
           "QEMU/KVM", firmwares=("bios",), provider="libvirt-daemon-driver-qemu"),
    # ESX is a client-side driver (no +ssh/+tcp forms): it talks to ESXi or vCenter over HTTPS.
    # BIOS only: the VMX converter refuses <os firmware='efi'> (libvirt 9.0).
    Driver("esx", ("esx", "vpx", "gsx"), "vmdk", frozenset(), "vmware.xml",
           "VMware ESXi / vCenter", firmwares=("bios",), provider="libvirt0"),
    # Workstation, Player and Fusion: the same VMX converter as ESX, run through vmrun on the host.
    Driver("vmware", _with_transports("vmwarews", "vmwareplayer", "vmwarefusion"), "vmdk", frozenset(),
           "vmware.xml", "VMware Workstation / Player / Fusion", firmwares=("bios",), snapshots=False,
           provider="libvirt0"),
    Driver("vbox", _with_transports("vbox"), "vdi", frozenset(), "vbox.xml", "VirtualBox",
           firmwares=("bios",), provider="libvirt-daemon-driver-vbox"),
    Driver("hyperv", ("hyperv",), "vhdx", frozenset(), "hyperv.xml", "Microsoft Hyper-V",
           firmwares=("bios",), snapshots=False, provider=""),
    # libvirt's own test driver: in memory, runs nothing; any path will do as a disk.
    Driver("test", ("test",), "raw", frozenset(), "test.xml", "libvirt's test driver", provider="libvirt0"),
)


def driver_for(uri: str) -> Driver:
    """The driver family a libvirt URI names, by its scheme."""
    scheme = urlsplit(uri).scheme.lower()
    for driver in DRIVERS:
        if scheme in driver.schemes:
            return driver
    known = ", ".join(sorted({s for d in DRIVERS for s in d.schemes if "+" not in s}))
    raise GuestError(f"libvirt URI {uri!r}: no driver the portable path knows has the scheme {scheme!r} "
                     f"(known: {known}); give a URI such as esx://host/ or vbox:///session")


def _probe_uri(uri: str, driver: Driver) -> str:
    """A URI that finds out whether the driver is there without logging in anywhere.

    ESX and Hyper-V are client-side drivers that would connect to the host and
    ask for credentials; pointed at a name that never resolves, they answer
    with a lookup error if they exist and "no connection driver" if not.
    """
    if driver.family not in ("esx", "hyperv"):
        return uri
    parts = urlsplit(uri)
    return urlunsplit((parts.scheme, PROBE_HOST, parts.path or "/", "", ""))


def _absent(driver: Driver, scheme: str) -> str:
    if driver.provider == "":
        return (f"this libvirt has no {driver.family} driver (Debian builds libvirt without it): "
                f"use a libvirt built with it (meson -Ddriver_{driver.family}=enabled) to reach {scheme}:// hosts")
    if driver.provider == "libvirt0":
        return (f"this libvirt has no {driver.family} driver: use a libvirt built with it "
                f"(Debian's libvirt0 has it) to reach {scheme}:// hosts")
    return (f"this libvirt has no {driver.family} driver: install Debian's {driver.provider} "
            f"(or use a libvirt built with it) to reach {scheme}:// hosts")


def compiled_in(uri: str) -> str | None:
    """None if the installed libvirt has the driver ``uri`` needs, else a one-line reason.

    Only a missing driver is reported: any other failure to connect (no such host, no
    credentials, vmrun missing) means the driver is there, and is left to the real connection.
    """
    driver = driver_for(uri)
    require_libvirt()
    probe = _probe_uri(uri, driver)

    def refuse_credentials(_credentials: object, _data: object) -> int:
        return -1

    auth = [[libvirt.VIR_CRED_AUTHNAME, libvirt.VIR_CRED_PASSPHRASE], refuse_credentials, None]
    try:
        conn = bounded(f"libvirt at {probe}", lambda: libvirt.openAuth(probe, auth, 0), PROBE_TIMEOUT)
    except libvirt.libvirtError as exc:
        message = exc.get_error_message() or ""
        if exc.get_error_code() == libvirt.VIR_ERR_NO_CONNECT or "was built without" in message:
            return _absent(driver, urlsplit(uri).scheme)
        return None
    except GuestError:  # no answer in time: something is there; the real connection will say what
        return None
    conn.close()
    return None


def require_firmware_boot(image: BuiltImage, driver: Driver) -> None:
    """Refuse an image the portable path cannot boot: only QEMU loads a kernel directly."""
    if image.kernel is not None:
        raise ImageError(f"{image.name} boots by direct kernel load, which only QEMU does; the portable path "
                         f"({driver.title}) boots a disk through firmware: use your own cloud image "
                         f"(image='...qcow2') or the libvirt backend's saved-state mode on a qemu:// URI")
    if image.firmware not in driver.firmwares:
        raise ImageError(f"{image.name} boots through {image.firmware or 'no'} firmware, which the portable path "
                         f"does not run on {driver.title} (it runs {'/'.join(driver.firmwares)}): use an image "
                         "made for that")


_BLOCK = re.compile(r"[ \t]*<!-- if (\w+) -->\n(.*?)[ \t]*<!-- end \1 -->\n", re.DOTALL)


def _default_console(driver: Driver, name: str, disk: str) -> str:
    """Where a serial console goes on the hypervisor when the caller does not say: beside the disk,
    or, on Hyper-V, a named pipe."""
    if driver.family == "hyperv":
        return f"\\\\.\\pipe\\{name}-console"
    folder, sep, _ = disk.rpartition("/")
    return f"{folder}{sep}{name}.console.log"


def portable_domain_xml(
    driver: Driver, *, name: str, memory_mb: int, cpus: int, disk: str, mac: str, network: str, firmware: str,
    **extra: object,
) -> str:
    """The domain XML of one guest on ``driver``, from its family's template.

    ``disk``, ``seed`` and ``console`` are paths as the hypervisor sees them (an ESXi datastore
    path such as ``[datastore1] vmfx/disk.vmdk``, a Windows path on Hyper-V). Extra values:
    ``seed`` (a cloud-init NoCloud ISO, attached read-only), ``uuid``, ``console`` (VMware,
    VirtualBox: a file; Hyper-V: a named pipe; default beside the disk).
    """
    if not driver.template:
        raise GuestError(f"libvirt's {driver.family} driver has no template under templates/: its guests' XML is "
                         "domain.xml (domain.py)")
    unknown = set(extra) - EXTRA_KEYS
    if unknown:
        raise TypeError(f"portable_domain_xml: unknown values {sorted(unknown)}")
    if firmware not in driver.firmwares:
        raise GuestError(f"the {driver.family} template boots {'/'.join(driver.firmwares)}, not {firmware!r}")
    if driver.family in ("esx", "vmware") and memory_mb % 4:
        raise GuestError(f"VMware wants memory in multiples of 4 MiB, not {memory_mb}")
    seed = extra.get("seed")
    flags = {
        "bios": firmware == "bios",
        "uefi": firmware == "uefi",
        "seed": seed is not None,
        "vnet": driver.family == "vmware",  # Workstation: the network is a vmnet, the NIC's target
    }
    text = _BLOCK.sub(lambda m: m.group(2) if flags[m.group(1)] else "", template_text(TEMPLATES / driver.template))
    values: dict[str, object] = {
        "name": name, "memory_mb": memory_mb, "cpus": cpus, "disk": disk, "mac": mac, "network": network,
        "uuid": extra.get("uuid") or uuid.uuid4(),
        "seed": seed if seed is not None else "",
        "console": extra.get("console") or _default_console(driver, name, disk),
    }
    return string.Template(text).substitute(
        {key: attr(value) for key, value in values.items()})
