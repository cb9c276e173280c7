"""The domain XML of one guest: the template ``domain.xml`` next to this file, filled in."""

from __future__ import annotations

import os
import string
import uuid
from pathlib import Path

from ...accel import AccelChoice
from ...channels.runner import PORT_NAME as RUNNER_PORT
from ...errors import ImageError
from ...images.image import BuiltImage
from ..base import MachineConfig
from ..common import TB_SIZE_MB, kernel_command_line, mac_for, opt
from .connection import Host, is_session
from .network import interface_xml
from .xmltext import attr, template_text, text

TEMPLATE = Path(__file__).with_name("domain.xml")
DEVICES_VERSION = 1  # bump when domain.xml's virtual hardware changes


def check_template() -> None:
    """A GuestError now if domain.xml is missing, not at the first guest."""
    template_text(TEMPLATE)


def render_domain(values: dict[str, object]) -> str:
    """Fill in domain.xml; values are escaped, except the ones that are whole XML elements."""
    return string.Template(template_text(TEMPLATE)).substitute(
        {k: (str(v) if k in RAW else attr(v)) for k, v in values.items()}
    )


# Placeholders that take whole XML elements, built (and escaped) here.
RAW = frozenset({"tcg_features", "cpu", "incoming", "seclabel", "serial", "boot", "disk_boot", "seed", "agent",
                 "firmware", "netdev", "interface"})


def boot_elements(image: BuiltImage, paths: dict[str, object]) -> dict[str, str]:
    """How the guest starts: its kernel directly, or through firmware from the disk's own bootloader.

    A firmware boot starts from the disk alone (the seed CD is not bootable). SeaBIOS is the
    machine's default firmware; OVMF's code and this guest's NVRAM go in as pflash drives, the
    NVRAM as qcow2 so that it is saved with the state and snapshots (savevm) include it.
    """
    if image.kernel is not None:
        return {
            "boot": (f"<kernel>{text(paths['kernel'])}</kernel><initrd>{text(paths['initrd'])}</initrd>"
                     f"<cmdline>{text(kernel_command_line(image.cmdline, vga=True))}</cmdline>"),
            "disk_boot": "",
            "firmware": "",
        }
    if image.firmware not in ("bios", "uefi"):
        raise ImageError(f"{image.name} has no kernel and firmware {image.firmware!r}, not bios or uefi; "
                         f"delete {image.directory} so it is prepared again")
    firmware = ""
    if image.firmware == "uefi":
        drives = (f"if=pflash,format=raw,unit=0,readonly=on,file={opt(paths['ovmf_code'])}",
                  f"if=pflash,format=qcow2,unit=1,file={opt(paths['nvram'])}")
        firmware = "".join(f"<qemu:arg value='-drive'/><qemu:arg value='{attr(d)}'/>" for d in drives)
    return {"boot": "", "disk_boot": "<boot order='1'/>", "firmware": firmware}


def seed_elements(image: BuiltImage, paths: dict[str, object]) -> str:
    """cloud-init's NoCloud seed: a read-only CD on a virtio-scsi controller, as the QEMU backend attaches it."""
    if image.seed is None:
        return ""
    return ("<controller type='scsi' index='0' model='virtio-scsi'/>"
            "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
            f"<source file='{attr(paths['seed'])}'/><target dev='sda' bus='scsi'/><readonly/></disk>")


AGENT_CHANNEL = ("<channel type='unix'><source mode='bind'/>"
                 "<target type='virtio' name='org.qemu.guest_agent.0'/></channel>")


def runner_channel(image: BuiltImage, paths: dict[str, object]) -> str:
    """vmfx-runner's port, on your own images' guests: on a socket of ours where ``paths`` names one (a local
    guest in saved-state mode), else where libvirt puts it (the same device; nothing here reaches it)."""
    if image.seed is None:
        return ""
    path = paths.get("runner")
    source = f"<source mode='bind' path='{attr(path)}'/>" if path is not None else "<source mode='bind'/>"
    return f"<channel type='unix'>{source}<target type='virtio' name='{RUNNER_PORT}'/></channel>"


def domain_xml(
    accel: AccelChoice, image: BuiltImage, config: MachineConfig, domain_name: str, host: Host,
    paths: dict[str, object], ssh_port: int, incoming: bool, domain_uuid: str | None = None,
    network: str | None = None, mac: str | None = None,
) -> str:
    """``paths``: kernel, initrd, overlay as the host sees them; console (local hosts only); for an image
    booted through firmware, seed and, with UEFI, ovmf_code and nvram.

    ``network``: snapshot mode, the guest's NIC (MAC ``mac``) on that libvirt network, and its console
    appended to (a revert keeps the log); None: QEMU's user-mode network with SSH forwarded to ``ssh_port``.
    """
    kvm = accel.accel == "kvm"
    local = host.storage is None
    append = " append='on'" if incoming or network is not None else ""
    # By the label, as the QEMU backend does: a URL's port may change between runs, its digest does not.
    user_mac = mac_for(config.label)
    netdev = ("<qemu:arg value='-netdev'/>"
              f"<qemu:arg value='user,id=net0,restrict={'on' if config.network == 'restricted' else 'off'},"
              f"hostfwd=tcp:127.0.0.1:{ssh_port}-:22'/>"
              f"<qemu:arg value='-device'/><qemu:arg value='virtio-net-pci,netdev=net0,mac={user_mac},addr=0x10'/>")
    return render_domain({
        "domain_type": "kvm" if kvm else "qemu",
        "name": domain_name,
        "uuid": domain_uuid or uuid.uuid4(),
        "memory_mb": config.memory_mb,
        "cpus": config.cpus,
        **boot_elements(image, paths),
        "tcg_features": "" if kvm else f"<tcg><tb-cache unit='MiB'>{TB_SIZE_MB}</tb-cache></tcg>",
        "cpu": "<cpu mode='host-passthrough'/>" if kvm else "",
        # Here QEMU runs as the user running the tests, and libvirt leaves our files' owners
        # alone (a session libvirtd has no DAC driver: its QEMUs are the user's already); on a
        # remote host, QEMU runs as that host's libvirt is configured to run it.
        "seclabel": (f"<seclabel type='static' model='dac' relabel='no'><label>+{os.getuid()}:+{os.getgid()}"
                     "</label></seclabel>") if local and not is_session(host.uri) else "",
        "overlay": paths["overlay"],
        "seed": seed_elements(image, paths),
        # Here the console goes to a file; from a remote host it is streamed back (ConsolePump).
        # A restore appends to the log its state's boot console begins (start_restored_console).
        "serial": (f"<serial type='file'><source path='{attr(paths['console'])}'{append}/>"
                   "<target port='0'/></serial>"
                   if local else "<serial type='pty'><target port='0'/></serial>"),
        "agent": AGENT_CHANNEL + runner_channel(image, paths) if image.agent else "",
        "netdev": netdev if network is None else "",
        "interface": interface_xml(network, mac or user_mac) if network is not None else "",
        "incoming": "<qemu:arg value='-incoming'/><qemu:arg value='defer'/>" if incoming else "",
    })
