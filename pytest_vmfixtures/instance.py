"""One running machine and its channels: binding them, boot readiness, warm-up after a restore.

The VM handle (:mod:`.guest`) holds an :class:`Instance` and swaps it on every
revert; the pool makes instances with these functions. Like the handle, this
talks to a backend only through the Machine protocol.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from .arch import by_name
from .backends.base import Machine, SnapshotReverting
from .channels import runner
from .channels.agent import Agent, AgentError
from .channels.ssh import SSH, HostKeyError, SSHError
from .clock import guest_clock_offset, set_clock_by_agent
from .command import CommandResult, new_tag
from .consolelog import console_tail
from .errors import BootError, CommandLost, CommandTimeout, VMError
from .images.image import BuiltImage
from .waiting import Deadline, wait_for

log = logging.getLogger("pytest_vmfixtures")


def diagnose_console(text: str, accel: str, seeded: bool = False) -> str:
    """One line saying what a boot log most likely shows.

    ``seeded``: the guest is your own image, started by its bootloader and set up by cloud-init.
    """
    if "Kernel panic" in text:
        line = next((ln for ln in text.splitlines() if "Kernel panic" in ln), "Kernel panic")
        return "kernel panic: " + line.split("Kernel panic", 1)[1].strip(" -:")
    if not text.strip():
        if seeded:
            return ("nothing on the serial console: the firmware found nothing to boot on the disk, or the "
                    "image's kernel does not write to ttyS0; check firmware= (bios or uefi) and that the disk boots")
        return "no console output at all: the kernel did not start (check the kernel, initrd and accel)"
    if seeded and "cloud-init" not in text.lower():
        return ("cloud-init never showed on the console: the image seems not to run it, and without it nothing "
                "installs the plugin's keys; use an image with cloud-init (see docs/cloud-images.md)")
    if "Gave up waiting for root" in text or "unable to mount root" in text.lower():
        return "the root disk was not found: the initrd lacks virtio_blk or root= is wrong"
    if "ssh" not in text.lower() and "login:" not in text:
        if accel == "tcg":
            return "userspace never reached sshd; under TCG this can simply be slow: raise --vm-boot-timeout"
        return "userspace never reached sshd"
    if "login:" in text:
        return "the system booted but SSH did not answer: sshd not running, or no network (DHCP)"
    return "sshd did not become reachable before the deadline"


@dataclass
class Instance:
    """One machine and the channels bound to it."""

    machine: Machine
    ssh: SSH  # as the image's login user: vm.ssh, vm.sftp, put and get
    agent: Agent | None = None
    snapshots: set[str] = field(default_factory=set)
    seeded: bool = False  # your own image, set up by cloud-init: what a failed boot most likely means differs
    root: SSH | None = None  # logged in as root, where the login user is another and root may log in with the key
    clock_offset: float | None = None  # guest minus host clock (s) measured after the warm-up set it; None: not measured

    @property
    def channel(self) -> str:
        """How commands reach the guest now: "agent" (qemu-guest-agent), "runner" (vmfx-runner) or "ssh"."""
        if self.agent is None:
            return "ssh"
        return "runner" if self.agent.what == runner.WHAT else "agent"

    @property
    def shell(self) -> SSH:
        """The SSH channel commands run on: root's own login where there is one, else the login user's, with sudo.

        sudo costs a command most of a second under emulation; a root login costs nothing per command.
        """
        return self.root if self.root is not None else self.ssh

    def run_by_agent(self, command: str, tag: str, timeout: float | None) -> CommandResult | None:
        """``command`` through the guest agent; None if there is none. An agent that fails is dropped for this
        instance, and AgentError means the command never started (another channel may run it). Once started,
        it is never run again: a lost agent raises CommandLost, after a kill through the agent or else SSH."""
        if self.agent is None:
            return None
        try:
            if not self.agent.connected:
                self.agent.connect(10.0)
            return self.agent.exec(command, tag, timeout, kill_elsewhere=self.shell.kill, elsewhere="SSH")
        except (AgentError, CommandLost):
            self.agent.close()
            self.agent = None
            raise

    def close_channels(self) -> None:
        """Close every channel (they reconnect on next use); the machine keeps running."""
        try:
            self.ssh.close()
            if self.root is not None:
                self.root.close()
        finally:
            if self.agent is not None:
                self.agent.close()

    def close(self) -> None:
        """Close the channels and stop the machine; the machine is stopped even if a channel fails to close."""
        try:
            self.close_channels()
        finally:
            self.machine.stop()


def root_channel(machine: Machine, image: BuiltImage, key: paramiko.PKey) -> SSH:
    root = SSH(machine.ssh_host, machine.ssh_port, "root", key, image.host_key, machine.name, machine.ssh_proxy)
    root.mac = guest_mac(machine)
    return root


def guest_mac(machine: Machine) -> str | None:
    """The MAC of the machine's NIC where its SSH address is on a network shared with other guests (libvirt's
    snapshot mode): every SSH session checks it reached that NIC. None: a port of its own (QEMU's hostfwd)."""
    mac = getattr(machine, "nic_mac", None)
    return mac if isinstance(mac, str) else None


def named_snapshot_calls(
    snapshots: SnapshotReverting,
) -> tuple[Callable[[Instance, str], None], Callable[[Instance, str], None]]:
    """How a guest reverted in place takes and reverts to a test's own snapshots: the hypervisor's API."""
    return (lambda instance, name: snapshots.take_named(instance.machine, name),
            lambda instance, name: snapshots.revert_named(instance.machine, name))


def retarget(instance: Instance) -> None:
    """Point the instance's SSH channels at the machine's current address (learned again after a revert)."""
    for channel in (instance.ssh, instance.root):
        if channel is not None and channel.host != instance.machine.ssh_host:
            channel.close()
            channel.host = instance.machine.ssh_host


def runner_socket(machine: Machine) -> Path | None:
    """Where vmfx-runner's port is reached on the host (your own images' guests, where the backend offers it).

    Not part of the Machine protocol, so that backends of other plugins need not know it.
    """
    path = getattr(machine, "runner_socket", None)
    return path if isinstance(path, Path) else None


def bind_channels(machine: Machine, image: BuiltImage, agent: bool = True, root_login: bool = False,
                  run_by_runner: bool = False) -> Instance:
    """The machine's channels. ``agent`` False: no agent answers there, so none is bound (commands go
    over SSH, or through vmfx-runner with ``run_by_runner``); ``root_login``: root may log in with the
    image's key (commands then skip sudo)."""
    key = paramiko.Ed25519Key.from_private_key_file(str(image.client_key))
    ssh = SSH(machine.ssh_host, machine.ssh_port, image.user, key, image.host_key, machine.name, machine.ssh_proxy)
    ssh.sudo = image.user != "root"
    ssh.mac = guest_mac(machine)
    channel: Agent | None = None
    if agent and machine.agent_transport is not None:
        channel = Agent.over(machine.agent_transport, machine.name)
    elif agent and machine.agent_socket is not None:
        channel = Agent(machine.agent_socket, machine.name)
    elif run_by_runner and runner_socket(machine) is not None:
        channel = Agent(runner_socket(machine), machine.name, what=runner.WHAT)
    root = root_channel(machine, image, key) if root_login and image.user != "root" else None
    return Instance(machine, ssh, channel, seeded=image.seed is not None, root=root)


AGENT_PROBE_SECONDS = 20.0  # for an image that may have no agent: its boot is done, an agent would be up


def agent_answers(instance: Instance, timeout: float) -> bool:
    """Whether a guest agent answers on the instance's channel; if none does, the instance stops asking."""
    if instance.agent is None:
        return False
    try:
        instance.agent.connect(timeout)
        return True
    except VMError:
        instance.agent.close()
        instance.agent = None
        return False


def runner_answers(instance: Instance, timeout: float) -> bool:
    """Whether vmfx-runner answers on the machine's port; if it does, the instance runs its commands there."""
    path = runner_socket(instance.machine)
    if path is None or instance.agent is not None:
        return False
    channel = Agent(path, instance.machine.name, what=runner.WHAT)
    try:
        channel.connect(timeout)
    except VMError:
        channel.close()
        return False
    instance.agent = channel
    return True


def root_login_works(instance: Instance, image: BuiltImage, timeout: float) -> bool:
    """Whether root logs in with the image's key (a seed authorizes it; an image's sshd may still refuse).

    If it does, the instance runs its commands through that login from now on.
    """
    if image.user == "root":
        return False
    root = root_channel(instance.machine, image, instance.ssh.key)
    try:
        root.connect(timeout=timeout)
        if root.exec("test \"$(id -u)\" = 0", new_tag(), timeout).ok:
            instance.root = root
            return True
    except (SSHError, CommandTimeout):
        pass
    root.close()
    return False


def boot_error(machine: Machine, message: str, accel: str, seeded: bool = False) -> BootError:
    """A BootError for ``machine`` with its console tail, command line and what the console most likely shows."""
    return BootError(
        f"{machine.name}: {message}",
        console_tail=console_tail(machine.console_log),
        command_line=machine.command_line,
        diagnosis=diagnose_console(console_tail(machine.console_log, 400), accel, seeded),
    )


def wait_ssh_ready(instance: Instance, timeout: float, accel: str) -> None:
    """Cold boot readiness: a command over SSH succeeds."""
    machine = instance.machine

    def attempt() -> bool | None:
        if not machine.alive():
            raise boot_error(machine, f"QEMU ended during boot: {machine.exit_description()}", accel, instance.seeded)
        if "Kernel panic" in console_tail(machine.console_log, 400):
            raise boot_error(machine, "the guest kernel panicked during boot", accel, instance.seeded)
        try:
            instance.ssh.connect(timeout=5)
            if instance.ssh.exec("true", new_tag(), 30).ok:
                return True
        except HostKeyError as exc:  # waiting does not make a key verify
            raise boot_error(machine, str(exc), accel, instance.seeded) from exc
        except (SSHError, CommandTimeout):
            instance.ssh.close()
        return None

    wait_for(f"SSH on {machine.name}", attempt, timeout, interval=0.25, max_interval=1.0,
             error=lambda message: boot_error(machine, message, accel, instance.seeded))


def clock_command() -> str:
    """Set the guest clock to the host's, to the microsecond, with busybox or coreutils date."""
    now = time.time()
    return f"date -u -s @{now:.6f} >/dev/null 2>&1 || date -u -s '{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(now))}' >/dev/null"


def warm_up(instance: Instance, image: BuiltImage, timeout: float = 60.0) -> None:
    """Make a just-restored instance answer: sync a channel, fix the clock.

    A restored guest wakes at the time its state was saved. Through the guest agent the clock is set with
    ``guest-set-time`` and read back (:mod:`.clock`; ``clock_offset`` records the result); a guest whose agent
    cannot, and guests without an agent, run ``date`` in a shell instead (over SSH: to within the time the
    shell takes to start).
    """
    if instance.agent is not None:
        try:
            instance.agent.connect(timeout)
            instance.clock_offset = set_clock_by_agent(instance.agent, timeout)
            if instance.clock_offset is None:
                instance.agent.exec(clock_command(), new_tag(), timeout).check()
                reading = guest_clock_offset(instance.agent, timeout)
                instance.clock_offset = None if reading is None else reading[0]
            return
        except VMError as exc:
            log.warning("%s: %s unusable after restore (%s); using SSH", instance.machine.name, instance.agent.what, exc)
            instance.agent.close()
            instance.agent = None
    _warm_up_over_ssh(instance, timeout)


def _warm_up_over_ssh(instance: Instance, timeout: float) -> None:
    """The clock command over SSH, the connection tried again until ``timeout``: right after a restore or
    a ``loadvm`` on a loaded host, the guest's sshd can drop the first handshake ("No existing session")."""
    deadline = Deadline(timeout)
    failures: list[SSHError] = []

    def attempt() -> bool | None:
        try:
            instance.shell.connect(min(max(deadline.remaining(), 1.0), 20.0))
        except HostKeyError:
            raise  # another key does not become the pinned one by trying again
        except SSHError as exc:
            failures[:] = [exc]
            instance.shell.close()
            return None
        instance.shell.exec(clock_command(), new_tag(), max(deadline.remaining(), 5.0)).check()
        return True

    wait_for(f"SSH on {instance.machine.name} after the restore", attempt, timeout, interval=0.25, max_interval=1.0,
             error=lambda message: failures[0] if failures else SSHError(f"{instance.machine.name}: {message}"))


def settle_first_boot(instance: Instance, image: BuiltImage, boot_timeout: float, accel: str) -> dict[str, object]:
    """Your own image's first boot, to its end: cloud-init done; returns which channels answer
    (``agent``, ``runner``, ``root_login``), facts kept with the state."""
    # Over SSH: whether an agent answers is asked only once the boot is done. `status --wait` returns as soon
    # as a stage has failed (an image without the locale it is told to set), before the final stage has run
    # the seed's runcmd, which starts vmfx-runner: its end (boot-finished) is waited for too, a bounded while.
    instance.ssh.exec("cloud-init status --wait >/dev/null 2>&1; i=0; while [ ! -e /var/lib/cloud/instance/boot-finished ] "
                      "&& [ $i -lt 600 ]; do sleep 1; i=$((i+1)); done; true", new_tag(), boot_timeout)
    # cloud-init may restart sshd as its last step, and a state saved in that moment has no
    # sshd listening (every restored guest's SSH is then reset): log in anew to prove it is back.
    instance.ssh.close()
    wait_ssh_ready(instance, boot_timeout, accel)
    # A login to a restored guest must not start a systemd user manager (seconds under emulation):
    # keep root's and the login user's running in the saved state, as lingering users'.
    users = " ".join(sorted({"root", image.user}))
    instance.ssh.exec(f"command -v loginctl >/dev/null && loginctl enable-linger {users} || true", new_tag(), 120)
    agent = agent_answers(instance, AGENT_PROBE_SECONDS)
    return {
        "agent": agent,
        "runner": not agent and runner_answers(instance, AGENT_PROBE_SECONDS),  # the image's agent preferred
        "root_login": root_login_works(instance, image, AGENT_PROBE_SECONDS),
    }


# The built-in images mask their tty1 getty (a boot-time cost nobody used); a login prompt on the screen,
# started before the state is saved, makes a failed test's screendump show the guest is up. Saved states'
# keys change with it through backends.common.kernel_args_key (the screen console that came with it).
TTY1_LOGIN = (
    "g=$(command -v agetty) && [ -c /dev/tty1 ] && { if [ -d /run/systemd/system ]; then "
    "systemd-run --quiet --unit=vmfx-tty1-login --property=Restart=always \"$g\" --noclear tty1 linux; "
    "else setsid \"$g\" --noclear tty1 linux </dev/null >/dev/null 2>&1 & fi; } >/dev/null 2>&1; "
)


# Under a loaded emulator udev may announce the serial port after systemd's 90 s device timeout, and the
# serial getty then fails for want of it: the state would be saved without a login prompt on the console.
# By the time the state is saved the port is there, so such a getty is started again.
SERIAL_LOGIN_RETRY = (
    "[ -d /run/systemd/system ] && for u in $(systemctl list-units --failed --plain --no-legend "
    "'serial-getty@*' 2>/dev/null | awk '{print $1}'); do systemctl reset-failed \"$u\"; systemctl start \"$u\"; "
    "done >/dev/null 2>&1; "
)


def login_prompts(image: BuiltImage) -> str:
    """The commands that leave a login prompt on the guest's console (and screen) in the saved state."""
    return screen_login(image) + SERIAL_LOGIN_RETRY


def screen_login(image: BuiltImage) -> str:
    """The command that puts a login prompt on a built-in x86 image's screen ("" elsewhere: cloud images have their own)."""
    try:
        vga = by_name(image.arch).x86
    except KeyError:
        return ""
    return TTY1_LOGIN if vga and image.seed is None else ""
