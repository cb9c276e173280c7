"""Snapshot mode: persistent domains on a libvirt network, reached at the address it reports, each
reverted by the hypervisor's own snapshot (snapshot.py takes and reverts them).

Any libvirt driver with the snapshot API (drivers.py); on the QEMU driver, this machine's libvirtd
only. Which capabilities its hosts give, whether the network is there, and starting a guest, which
is dropped whole (domain, overlay, disk copy) if it does not come up with an address in time.
Saved states are saved-state mode's (saved_state.py).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

from ...consolelog import console_tail
from ...errors import BootError, GuestError, ImageError, SnapshotError
from ...images.cache import Cache
from ...images.image import BuiltImage
from ...waiting import wait_for
from ..base import LanSegment, Machine, MachineConfig, SavedState
from ..common import mac_for
from .calls import bounded, libvirt
from .connection import Host, connect_for_snapshots, is_qemu_host
from .convert import converted_disk
from .domain import domain_xml
from .drivers import driver_for, require_firmware_boot
from .machine import LibvirtMachine
from .mode import ModeContext
from .names import run_name
from .network import guest_address, network_problem
from .snapshot import console_missing, non_qemu_domain_xml, revert_clean, revert_named, take_clean, take_named
from .storage import drop_files, host_files
from .teardown import drop_domain

# What a guest keeps per driver (drivers.DRIVERS): the QEMU driver passes agent commands through and
# writes the console to a file; no driver offers QEMU's saved state, its monitor or a forwarded port.
SNAPSHOT_QEMU_CAPABILITIES = driver_for("qemu:///system").capabilities


def snapshot_capabilities(hosts: list[Host]) -> frozenset[str]:
    """What every host's guests have (a test lands on any host)."""
    return frozenset.intersection(*(SNAPSHOT_QEMU_CAPABILITIES if is_qemu_host(h) else frozenset() for h in hosts))


def network_problems(hosts: list[Host], network: str) -> str | None:
    """Why a QEMU host's guests could not be reached on ``network`` (the first such host), or None.

    Another driver's networking is its host's own (see docs/libvirt.md).
    """
    for host in hosts:
        if is_qemu_host(host):
            problem = network_problem(host.conn, host.uri, network)
            if problem:
                return problem
    return None


class SnapshotMode:
    """Guests in persistent domains on ``network``, each with ``boot_timeout`` to show an address there."""

    def __init__(self, ctx: ModeContext, network: str, boot_timeout: float) -> None:
        self.ctx = ctx
        self.network = network
        self.boot_timeout = boot_timeout

    def connect(self, uri: str) -> Host:
        return connect_for_snapshots(uri)

    def check_hosts(self, hosts: list[Host]) -> str | None:
        return network_problems(hosts, self.network)  # no version check: a guest's snapshots stay on its host

    def capabilities(self, hosts: list[Host]) -> frozenset[str]:
        return snapshot_capabilities(hosts)

    def describe(self) -> str:
        return f", snapshot mode on network {self.network}"

    def restore(self, image: BuiltImage, config: MachineConfig, state: SavedState, name: str) -> LibvirtMachine:
        raise SnapshotError("the libvirt backend in snapshot mode has no saved states to restore")

    def save(self, machine: LibvirtMachine, directory: Path) -> None:
        raise SnapshotError("the libvirt backend in snapshot mode saves no states (its guests keep snapshots)")

    def attach_lan(self, machine: Machine, segment: LanSegment, mac: str) -> None:
        # A NIC libvirt does not know of would also break the revert to the snapshot.
        raise GuestError(f"{machine.name}: private networks (vm_network) plug a NIC in through QEMU's monitor, "
                         "which snapshot mode does not use; mark such tests @pytest.mark.vm(needs=[\"qmp\"])")

    def take_clean(self, machine: LibvirtMachine) -> None:
        take_clean(machine)

    def revert_clean(self, machine: LibvirtMachine) -> None:
        revert_clean(machine)
        self.relearn_address(machine)

    def take_named(self, machine: LibvirtMachine, name: str) -> None:
        take_named(machine, name)

    def revert_named(self, machine: LibvirtMachine, name: str) -> None:
        revert_named(machine, name)
        self.relearn_address(machine)

    def close(self, hosts: list[Host]) -> None:
        """Nothing: a guest's domain, snapshots and disk go when it stops."""

    def boot(self, image: BuiltImage, config: MachineConfig, name: str) -> LibvirtMachine:
        """Define and start a persistent domain on the network; returns once the guest has an address there."""
        domain_name = run_name(self.ctx.runtime.session_id, name)
        host = self.ctx.placement.pick(domain_name, image)
        files, _socks = self.ctx.runtime.machine_dirs(name)
        mac = mac_for(domain_name)  # one per domain: the network's DHCP tells guests apart by it
        machine: LibvirtMachine | None = None
        domain: Any = None
        try:
            if is_qemu_host(host):
                paths = host_files(host.storage, image, image.disk, "overlay.qcow2", files, None, self.ctx.qemu_img,
                                   self.ctx.progress)
                xml = domain_xml(self.ctx.accel, image, config, domain_name, host, paths, 22, incoming=False,
                                 network=self.network, mac=mac)
            else:  # the image's disk converted to the driver's format (once, cached), copied for this guest
                require_firmware_boot(image, driver_for(host.uri))  # refused before gigabytes are converted and copied
                disk = self.guest_disk(image, host, files)
                paths = {"overlay": disk}
                xml = non_qemu_domain_xml(host.uri, image, config, str(disk), domain_name, mac=mac, network=self.network)
            domain = bounded(f"{name}: defining it on {host.uri}", lambda: host.conn.defineXML(xml), 60.0, undo=drop_domain)
            nvram = paths.get("nvram")
            machine = LibvirtMachine(host, domain, name, files, 22, xml, image.agent and is_qemu_host(host),
                                     image.disk, str(paths["overlay"]), nvram if isinstance(nvram, Path) else None,
                                     on_stop=self.ctx.placement.forget)
            machine.ssh_proxy = None
            self.ctx.placement.register(machine)
            if not is_qemu_host(host):
                console_missing(machine, str(host.conn.getType()))
            bounded(f"{name}: starting on {host.uri}", domain.create, 120.0)
            machine.ssh_host = self._wait_address(machine, mac)
            machine.nic_mac = mac
            return machine
        except libvirt.libvirtError as exc:
            self._drop_failed_boot(host, domain_name, files, machine, domain)
            raise BootError(f"libvirt did not start {domain_name} on {host.uri}", console_tail=exc.get_error_message(),
                            command_line=["libvirt", host.uri, domain_name]) from exc
        except BaseException:
            self._drop_failed_boot(host, domain_name, files, machine, domain)
            raise

    def guest_disk(self, image: BuiltImage, host: Host, files: Path) -> Path:
        """This guest's own copy of the image's disk in the format of ``host``'s driver (its snapshot lives in
        it, so guests cannot share one); the conversion is made once per image and format and cached.

        The path is this machine's: right for a hypervisor on this machine (VirtualBox, VMware Workstation);
        a remote one (ESXi, Hyper-V) needs the disk on its own storage first (docs/libvirt.md).
        """
        driver = driver_for(host.uri)
        converted = converted_disk(Cache(self.ctx.runtime.cache_dir), image, driver.disk_format, self.ctx.qemu_img, self.ctx.progress)
        self.ctx.runtime.record_use(converted)  # images prune keeps it while this run lasts
        target = files / f"disk.{driver.disk_format}"
        try:
            subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(converted), str(target)], check=True,
                           capture_output=True, timeout=600)
            os.chmod(target, 0o600)
        except (OSError, subprocess.SubprocessError) as exc:
            with contextlib.suppress(OSError):
                target.unlink()
            why = exc.stderr.decode(errors="replace").strip() if isinstance(exc, subprocess.CalledProcessError) else exc
            raise ImageError(f"cannot copy {converted} for {files.name}: {why}") from exc
        return target

    def _drop_failed_boot(self, host: Host, domain_name: str, files: Path,
                          machine: LibvirtMachine | None, domain: Any) -> None:
        if machine is not None:
            machine.stop()
            return
        if domain is not None:
            drop_domain(domain)
        self.ctx.placement.release(host, domain_name)
        drop_files(host.storage, "overlay.qcow2", files)
        for copy in files.glob("disk.*"):  # a non-QEMU driver's disk copy (guest_disk)
            with contextlib.suppress(OSError):
                copy.unlink()

    def relearn_address(self, machine: LibvirtMachine) -> None:
        """After a revert: the guest's address on the network as the hypervisor sees it now (a revert rewinds
        the guest's DHCP client; the address it had may be another guest's by now, or it may take a new one),
        and the guest answering there.

        A revert starts a new QEMU whose new tap device joins the network's bridge; where the bridge runs STP
        (libvirt's stock ``default`` network does) the port forwards nothing for a few seconds, and a
        connection tried then fails at once with "no route to host". So the revert ends once the guest's
        TCP stack answers at its SSH port, with a refusal (a test may have reverted to a snapshot without an
        SSH server) as good as an accept."""
        if machine.nic_mac is not None:
            machine.ssh_host = self._wait_address(machine, machine.nic_mac)
            wait_answering(machine, REACHABLE_TIMEOUT)

    def _wait_address(self, machine: LibvirtMachine, mac: str) -> str:
        """The guest's address on the network, once its DHCP client has one (the boot is then well on its way)."""
        tried: dict[str, str] = {}

        def attempt() -> str | None:
            if not machine.alive():
                raise BootError(f"{machine.name}: the domain ended during boot: {machine.exit_description()}",
                                console_tail=console_tail(machine.console_log), command_line=machine.command_line)
            return guest_address(machine.domain, mac, tried)

        def error(message: str) -> BootError:
            sources = "; ".join(f"{k}: {v}" for k, v in tried.items()) or "none asked"
            return BootError(f"{machine.name}: no address on network {self.network!r} ({message}; {sources})",
                             console_tail=console_tail(machine.console_log), command_line=machine.command_line)

        return wait_for(f"{machine.name}'s address on {self.network}", attempt, self.boot_timeout,
                        interval=0.5, max_interval=2.0, error=error)


REACHABLE_TIMEOUT = 60.0


def wait_answering(machine: LibvirtMachine, timeout: float) -> None:
    last: list[str] = []

    def attempt() -> bool | None:
        try:
            with socket.create_connection((machine.ssh_host, machine.ssh_port), timeout=1.0):
                return True
        except ConnectionRefusedError:
            return True
        except OSError as exc:
            last[:] = [str(exc)]
            return None

    def error(message: str) -> BootError:
        return BootError(f"{machine.name}: not answering at {machine.ssh_host}:{machine.ssh_port} after the revert "
                         f"({message}; last: {last[0] if last else 'nothing'})",
                         console_tail=console_tail(machine.console_log), command_line=machine.command_line)

    wait_for(f"{machine.name} answering at {machine.ssh_host}", attempt, timeout, interval=0.2, max_interval=1.0,
             error=error)
