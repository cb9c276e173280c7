"""The domain XML of one guest: the template ``domain.xml`` next to this file, filled in."""

from __future__ import annotations

import functools
import os
import string
import uuid
from pathlib import Path
from xml.sax.saxutils import escape

from ...accel import AccelChoice
from ...errors import GuestError, ImageError
from ...images.image import BuiltImage
from ..base import MachineConfig
from ..common import KERNEL_ARGS, TB_SIZE_MB, mac_for
from .connection import Host, is_session

TEMPLATE = Path(__file__).with_name("domain.xml")
DEVICES_VERSION = 1  # bump when domain.xml's virtual hardware changes


def check_template() -> None:
    if not TEMPLATE.is_file():
        raise GuestError(f"the libvirt domain template {TEMPLATE} is missing (broken installation)")


@functools.cache
def _template() -> string.Template:
    return string.Template(TEMPLATE.read_text())


def render_domain(values: dict[str, object]) -> str:
    """Fill in domain.xml; values are escaped, except the ones that are whole XML elements."""
    raw = {"tcg_features", "cpu", "incoming", "seclabel", "serial"}
    return _template().substitute(
        {k: (str(v) if k in raw else escape(str(v), {"'": "&apos;", '"': "&quot;"})) for k, v in values.items()}
    )


def domain_xml(
    accel: AccelChoice, image: BuiltImage, config: MachineConfig, domain_name: str, host: Host,
    paths: dict[str, object], ssh_port: int, incoming: bool, domain_uuid: str | None = None,
) -> str:
    """``paths``: kernel, initrd, overlay as the host sees them; console (local hosts only)."""
    kvm = accel.accel == "kvm"
    if image.kernel is None:
        raise ImageError(f"{image.name} boots through firmware (your own image); use --vm-backend qemu for it")
    local = host.storage is None
    append = " append='on'" if incoming else ""
    return render_domain({
        "domain_type": "kvm" if kvm else "qemu",
        "name": domain_name,
        "uuid": domain_uuid or uuid.uuid4(),
        "memory_mb": config.memory_mb,
        "cpus": config.cpus,
        "kernel": paths["kernel"],
        "initrd": paths["initrd"],
        "cmdline": f"{image.cmdline} {KERNEL_ARGS}",
        "tcg_features": "" if kvm else f"<tcg><tb-cache unit='MiB'>{TB_SIZE_MB}</tb-cache></tcg>",
        "cpu": "<cpu mode='host-passthrough'/>" if kvm else "",
        # Here QEMU runs as the user running the tests, and libvirt leaves our files' owners
        # alone (a session libvirtd has no DAC driver: its QEMUs are the user's already); on a
        # remote host, QEMU runs as that host's libvirt is configured to run it.
        "seclabel": (f"<seclabel type='static' model='dac' relabel='no'><label>+{os.getuid()}:+{os.getgid()}"
                     "</label></seclabel>") if local and not is_session(host.uri) else "",
        "overlay": paths["overlay"],
        # Here the console goes to a file; from a remote host it is streamed back (ConsolePump).
        # A restore appends to the log its state's boot console begins (start_restored_console).
        "serial": (f"<serial type='file'><source path='{escape(str(paths['console']))}'{append}/>"
                   "<target port='0'/></serial>"
                   if local else "<serial type='pty'><target port='0'/></serial>"),
        "restrict": "on" if config.network == "restricted" else "off",
        "ssh_port": ssh_port,
        "mac": mac_for(config.image),
        "incoming": "<qemu:arg value='-incoming'/><qemu:arg value='defer'/>" if incoming else "",
    })
