"""The handle a test gets: ``vm.run``, ``vm.ssh``, ``vm.qmp``, snapshots.

A handle outlives the QEMU processes behind it. Reverting to the clean state
swaps in another instance restored from the saved ready state (usually one
prepared in the background while the test ran), so the handle's channels are
re-bound rather than the handle replaced. Its state is explicit and every
operation checks it.
"""

from __future__ import annotations

import enum
import logging
import os
import re
import shlex
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import paramiko

from .backends.base import ALL_CAPABILITIES, Machine, MachineConfig
from .changes import DIFF_SCRIPT, WALKED, Changes, check_patterns, default_patterns, parse
from .channels.agent import AgentError
from .channels.ssh import SSHError
from .command import DEFAULT_COMMAND_TIMEOUT, CommandResult, new_tag
from .consolelog import console_tail
from .errors import CommandLost, CommandTimeout, GuestError, QMPError, SnapshotError
from .images.image import BuiltImage, GuestOS
from .instance import Instance, retarget, warm_up
from .waiting import Deadline, wait_for

log = logging.getLogger("pytest_vmfixtures")

EXIT_GRACE_SECONDS = 1.0  # how long a broken channel waits to see whether the machine is ending

CLEAN = "clean"


class GuestState(enum.Enum):
    READY = "ready"  # clean, nobody has touched it since the last revert
    DIRTY = "dirty"  # a test may have changed it
    REVERTING = "reverting"
    DEAD = "dead"


class VM:
    """A guest for one test at a time. See the README for the full API."""

    def __init__(
        self,
        name: str,
        image: BuiltImage,
        config: MachineConfig,
        accel: str,
        instance: Instance,
        fresh_instance: Callable[[], Instance],
        discard: Callable[[Instance], None],
        guest_os: Callable[[VM], GuestOS] | None = None,
        boot_timeout: float = 300.0,
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
        capabilities: frozenset[str] = ALL_CAPABILITIES,
        revert_in_place: Callable[[Instance], None] | None = None,
        named_snapshots: tuple[Callable[[Instance, str], None], Callable[[Instance, str], None]] | None = None,
        changes_ignore: tuple[str, ...] = (),
    ) -> None:
        """``revert_in_place``: where the hypervisor has no saved state to restore ("saved_state" not in
        ``capabilities``), reset puts this very instance back into its clean snapshot instead of swapping.
        ``named_snapshots``: without QMP, how to take and revert to a test's own snapshot (hypervisor API)."""
        self.name = name
        self.capabilities = capabilities  # what the hypervisor offers this guest (backends.base.CAPABILITIES)
        self._image = image
        self.config = config
        self.accel = accel
        self._instance = instance
        self._fresh_instance = fresh_instance
        self._discard = discard
        self._revert_in_place = revert_in_place
        self._named_snapshots = named_snapshots
        self._changes_ignore = changes_ignore  # vm_changes_ignore: on top of changes.DEFAULT_IGNORE
        self._guest_os = guest_os
        self._os: GuestOS | None = None
        self.boot_timeout = boot_timeout
        self.command_timeout = command_timeout  # the deadline of run, put and get when given none
        self.state = GuestState.READY
        self.qmp = QMPProxy(self)
        self.network_ip: str | None = None
        self.network_name: str | None = None
        self._host: Any = None

    # -- descriptive -------------------------------------------------------
    @property
    def image(self) -> str:
        return self.config.image

    @property
    def built_image(self) -> BuiltImage:
        return self._image

    @property
    def os(self) -> GuestOS:
        """Facts about the guest OS, read from the guest once per handle."""
        if self._os is None:
            self._os = self._guest_os(self) if self._guest_os is not None else self._image.os
        return self._os

    @property
    def machine(self) -> Machine:
        """The backend's machine; whoever holds it can change the guest, so it counts as use."""
        return self._usable().machine

    @property
    def ip(self) -> str:
        """This guest's address on the test's private network (see the vm_network fixture)."""
        if self.network_ip is None:
            raise GuestError(f"{self.name} is on no private network; add it with vm_network.add() or .attach()")
        return self.network_ip

    @property
    def console_log(self) -> Path:
        return self._instance.machine.console_log

    @property
    def ssh_host(self) -> str:
        return self._usable().machine.ssh_host

    @property
    def ssh_port(self) -> int:
        """The forwarded SSH port on the host's loopback (22 on the guest's own address where there is no port
        forward: libvirt's snapshot mode); asking for it counts as use."""
        return self._usable().machine.ssh_port

    @property
    def ssh_key(self) -> Path:
        return self._image.client_key

    @property
    def ssh_user(self) -> str:
        return self._image.user

    @property
    def channel(self) -> str:
        """How ``vm.run`` reaches the guest now: ``"agent"`` (the QEMU guest agent), ``"runner"`` (vmfx-runner,
        on your own images without an agent) or ``"ssh"``: where neither runs, or after either failed.
        Asking does not count as use."""
        return self._instance.channel

    def machine_alive(self) -> bool:
        return self.state != GuestState.DEAD and self._instance.machine.alive()

    def screendump(self, path: Path) -> None:
        """Save the guest's screen (its VGA console) as a PNG file."""
        if "qmp" not in self.capabilities:
            raise GuestError(f"{self.name}: screendumps are taken through QEMU's monitor, which this hypervisor "
                             "does not offer")
        qmp = self._instance.machine.qmp
        path.parent.mkdir(parents=True, exist_ok=True)
        qmp.execute("screendump", {"filename": str(path), "format": "png"})

    def ssh_command(self) -> str:
        """A command line a person can paste to get a shell in this guest (getting one counts as use)."""
        if self.state == GuestState.READY:
            self.state = GuestState.DIRTY
        machine = self._instance.machine
        # Host key checking stays on: the key is pinned, so a known_hosts file with just that key (in the
        # machine's private directory, under an alias that no port or address change can confuse).
        alias = f"vmfx-{machine.name}"
        known_hosts = machine.console_log.parent / "known_hosts"
        fd = os.open(known_hosts, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(f"{alias} {self._image.host_key.strip()}\n")
        return (
            f"ssh -i {shlex.quote(str(self._image.client_key))} -p {machine.ssh_port} "
            f"-o StrictHostKeyChecking=yes -o UserKnownHostsFile={shlex.quote(str(known_hosts))} "
            f"-o HostKeyAlias={alias} "
            + (f"-o ProxyCommand={shlex.quote(machine.ssh_proxy)} " if machine.ssh_proxy else "")
            + f"{self._image.user}@{machine.ssh_host}"
        )

    def __repr__(self) -> str:
        return f"<VM {self.name} {self.config.describe()} {self.state.value}>"

    # -- state -------------------------------------------------------------
    def _usable(self) -> Instance:
        if self.state in (GuestState.DEAD, GuestState.REVERTING):
            raise GuestError(f"{self.name} is {self.state.value}; it cannot be used now")
        if not self._instance.machine.alive():  # never reconnect: its port or address may be another guest's now
            raise self._died(GuestError(f"{self.name}: its machine has ended"))
        self.state = GuestState.DIRTY
        return self._instance

    def _ended(self) -> bool:
        """Whether the machine has ended, after a broken channel.

        A channel breaks as QEMU's sockets close, which can be a moment before its process has ended:
        a dying machine gets that moment, so the error says it died rather than what the channel saw.
        """
        machine = self._instance.machine
        grace = Deadline(EXIT_GRACE_SECONDS)
        while machine.alive() and not grace.expired():
            time.sleep(0.05)
        return not machine.alive()

    def _died(self, exc: Exception) -> GuestError:
        machine = self._instance.machine
        if not self._ended():
            return exc if isinstance(exc, GuestError) else GuestError(str(exc))
        self.state = GuestState.DEAD
        return GuestError(
            f"guest {self.name} died: {machine.exit_description()}\nlast console lines:\n"
            f"{console_tail(machine.console_log, 20)}"
        )

    # -- commands ------------------------------------------------------------
    def run(self, command: str, timeout: float | None = None, check: bool = False) -> CommandResult:
        """Run ``command`` with /bin/sh in the guest as root (see ``channel``: the agent, else SSH as root, else ``sudo -n``).

        Past ``timeout`` seconds (None: ``command_timeout``, from --vm-command-timeout) it is killed with
        its children and :class:`CommandTimeout` is raised.
        """
        instance = self._usable()
        timeout = self.command_timeout if timeout is None else timeout
        tag = new_tag()
        result: CommandResult | None = None
        try:  # the agent runs commands as root, as SSH does through sudo
            result = instance.run_by_agent(command, tag, timeout)
        except (AgentError, CommandLost) as exc:  # AgentError: it never started, so SSH may run it
            if self._ended():
                raise self._died(exc) from exc
            if isinstance(exc, CommandLost):
                raise
            log.warning("%s: command channel failed (%s); falling back to SSH", self.name, exc)
        if result is None:
            try:
                result = instance.shell.exec(command, tag, timeout)
            except SSHError as exc:
                raise self._died(exc) from exc
        return result.check() if check else result

    @property
    def host(self) -> Any:
        """A testinfra ``Host`` for this guest (``vm.host.package("nginx").is_installed``).

        Its commands go through ``vm.run``: the guest's current channel, as root, counting as use,
        and after a revert to the clean guest. Needs ``pip install 'pytest-vmfixtures[testinfra]'``.
        """
        if self._host is None:
            from .testinfra_host import make_host  # testinfra is optional: imported on first use only

            self._host = make_host(self)
        return self._host

    @property
    def ssh(self) -> paramiko.SSHClient:
        """A connected paramiko client (connected on first use, again after a revert)."""
        instance = self._usable()
        try:
            return instance.ssh.client
        except SSHError as exc:
            raise self._died(exc) from exc

    @property
    def sftp(self) -> paramiko.SFTPClient:
        instance = self._usable()
        try:
            return instance.ssh.sftp
        except SSHError as exc:
            raise self._died(exc) from exc

    def put(self, local: str | Path, remote: str, timeout: float | None = None) -> None:
        """Copy a host file into the guest; past ``timeout`` (None: ``command_timeout``) CommandTimeout."""
        self._transfer("put", str(local), remote, timeout)

    def get(self, remote: str, local: str | Path, timeout: float | None = None) -> None:
        """Copy a guest file to the host; past ``timeout`` (None: ``command_timeout``) CommandTimeout."""
        self._transfer("get", remote, str(local), timeout)

    def _transfer(self, direction: str, source: str, target: str, timeout: float | None) -> None:
        instance = self._usable()
        try:
            instance.ssh.transfer(direction, source, target, self.command_timeout if timeout is None else timeout)
        except SSHError as exc:
            raise self._died(exc) from exc

    def changes(self, ignore: Iterable[str] = ()) -> Changes:
        """What this test changed in the guest's filesystems and packages since its clean state.

        ``ignore``: absolute path globs left out (with what lies below them), on top of the defaults and the
        ``vm_changes_ignore`` ini key. Asking changes nothing: a guest nobody used stays clean."""
        patterns = check_patterns(ignore, "vm.changes(ignore=...)")
        before = self.state
        try:
            result = self.run(DIFF_SCRIPT, timeout=max(self.command_timeout, 120.0))
        except GuestError as exc:
            if self.state == GuestState.DEAD:
                raise  # as vm.run says it
            first = (str(exc).strip().splitlines() or ["no answer"])[0]
            raise GuestError(f"{self.name}: vm.changes() cannot tell what changed: the guest runs no commands "
                             f"any more ({first})") from exc
        if before == GuestState.READY and self.state == GuestState.DIRTY:
            self.state = GuestState.READY  # reading changes nothing: the guest needs no revert for it
        log.debug("%s: vm.changes() %s in %.2f s", self.name, "listed every path" if WALKED in result.stdout
                  else "looked at the paths its watcher noted", result.duration)
        return parse(self.name, result, default_patterns() + self._changes_ignore + patterns)

    # -- snapshots -----------------------------------------------------------
    def snapshot(self, name: str) -> None:
        """Save the running guest under ``name`` (lives until the test ends)."""
        if name == CLEAN:
            raise SnapshotError("'clean' is the snapshot every test starts from; pick another name")
        if "qmp" not in self.capabilities and self._named_snapshots is not None:
            instance = self._usable()
            self._named_snapshots[0](instance, name)
            instance.snapshots.add(name)
            return
        if "qmp" not in self.capabilities:
            raise SnapshotError(f"{self.name}: named snapshots are taken through QEMU's monitor, which this "
                                "hypervisor does not offer; mark such tests @pytest.mark.vm(needs=[\"qmp\"])")
        instance = self._usable()
        self._hmp(instance, f"savevm {name}")
        instance.snapshots.add(name)

    def revert(self, name: str = CLEAN) -> None:
        """Go back to ``name``; ``clean`` is the state every test starts from."""
        if name == CLEAN:
            self.reset()
            return
        instance = self._usable()
        if name not in instance.snapshots:
            known = ", ".join(sorted(instance.snapshots)) or "none"
            raise SnapshotError(f"no snapshot {name!r} on {self.name} (taken in this test: {known})")
        instance.close_channels()
        if "qmp" not in self.capabilities and self._named_snapshots is not None:
            self._named_snapshots[1](instance, name)
            retarget(instance)
        else:
            self._hmp(instance, f"loadvm {name}")
            instance.machine.after_load()
        warm_up(instance, self._image)

    def _hmp(self, instance: Instance, command: str) -> None:
        try:
            out = instance.machine.qmp.human(command, timeout=300)
        except GuestError as exc:
            raise self._died(exc) from exc
        if out.strip():  # savevm and loadvm print nothing on success
            raise SnapshotError(f"{self.name}: {command} failed: {out.strip()}")

    def reset(self) -> None:
        """Replace the running instance by a clean one. Used between tests."""
        if self.state == GuestState.READY:
            return  # untouched since the last revert: nothing to undo
        self.state = GuestState.REVERTING
        old = self._instance
        if self._revert_in_place is not None:
            try:
                self._revert_in_place(old)
            except BaseException:
                self.state = GuestState.DEAD  # a guest that did not revert is dropped; the next test gets a new one
                self._discard(old)
                raise
            self.state = GuestState.READY
            return
        try:
            self._instance = self._fresh_instance()
        except BaseException:
            self.state = GuestState.DEAD
            self._discard(old)
            raise
        self._discard(old)
        self.network_ip = self.network_name = None  # the hot-plugged NIC went with the old instance
        self.state = GuestState.READY

    def reboot(self, timeout: float | None = None) -> None:
        """Reboot the guest OS from inside and wait until it answers again."""
        instance = self._usable()
        before = self.run("cat /proc/sys/kernel/random/boot_id", check=True).stdout.strip()
        self.run("(sleep 0.5; reboot) >/dev/null 2>&1 &", check=True)
        instance.close_channels()
        deadline = Deadline(timeout or self.boot_timeout)

        def rebooted() -> bool | None:
            if not instance.machine.alive():
                raise self._died(GuestError("QEMU exited during reboot"))
            try:
                now = self.run("cat /proc/sys/kernel/random/boot_id", timeout=10).stdout.strip()
            except (GuestError, CommandTimeout):
                return None
            return True if now and now != before else None

        wait_for(f"{self.name} to come back from reboot", rebooted, deadline.remaining(), interval=1.0)

    def kill(self) -> None:
        """Stop the guest for good (used by the pool at the end)."""
        self.state = GuestState.DEAD
        self._discard(self._instance)


class QMPProxy:
    """``vm.qmp``: always the monitor of the instance currently behind the handle."""

    def __init__(self, vm: VM) -> None:
        self._vm = vm

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        instance = self._vm._usable()
        if "qmp" not in self._vm.capabilities:
            raise QMPError(command, "Unavailable", "this hypervisor has no QMP monitor; mark tests that need it "
                           "@pytest.mark.vm(needs=[\"qmp\"]) so they are skipped where it is missing")
        try:
            return instance.machine.qmp.execute(command, arguments)
        except GuestError as exc:
            if self._vm._ended():
                raise self._vm._died(exc) from exc
            raise


def read_guest_os(vm: VM) -> GuestOS:
    """Read the OS facts from the guest itself, falling back to the recipe's for what it cannot tell."""
    script = (
        ". /etc/os-release 2>/dev/null; echo \"id=$ID\"; echo \"version=$VERSION_ID\"; "
        # The service manager, not just PID 1's name: OpenRC runs under sysvinit's or busybox's init.
        "if [ -d /run/systemd/system ]; then echo init=systemd; elif [ -d /run/openrc ]; then echo init=openrc; "
        "else case $(readlink /proc/1/exe 2>/dev/null) in *busybox*) echo init=busybox;; "
        "*) [ -f /etc/inittab ] && echo init=sysvinit || echo \"init=$(cat /proc/1/comm 2>/dev/null)\";; esac; fi; "
        "echo \"arch=$(uname -m)\"; "
        "for pm in apt-get dnf yum zypper apk pacman pkg opkg; do "
        "command -v $pm >/dev/null 2>&1 && { echo \"pm=$pm\"; break; }; done"
    )
    state = vm.state
    out = vm.run(script).stdout
    vm.state = state  # reading facts does not dirty the guest
    facts = dict(re.findall(r"^(\w+)=(.*)$", out, re.M))
    fallback = vm.built_image.os
    init = facts.get("init", "")
    pm = {"apt-get": "apt"}.get(facts.get("pm", ""), facts.get("pm", "")) or fallback.package_manager
    return GuestOS(
        id=facts.get("id") or fallback.id,
        version=facts.get("version") or fallback.version,
        init=init or fallback.init,
        package_manager=pm,
        arch=facts.get("arch") or fallback.arch,
    )
