"""What ``vm.run`` returns, how long it may run, and how a command is tagged so it can be killed.

Every command runs under ``/bin/sh -c`` whatever the channel, with a
``VMFIX_RUN`` tag in its environment. On timeout the tag finds the command
and every process it started (children inherit the environment), so the
guest is left usable without knowing process groups or sessions. No command
waits forever: one given no timeout gets the session's default deadline
(``--vm-command-timeout``).
"""

from __future__ import annotations

import shlex
import uuid
from dataclasses import dataclass

from .errors import CommandError

TAG = "VMFIX_RUN"
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Seconds a command (or file transfer) given no timeout may take: longer than a cold boot's default
# (600 s), for package installs and builds under TCG; short enough that a hung one ends the test, not the run.
DEFAULT_COMMAND_TIMEOUT = 900.0


@dataclass(frozen=True)
class CommandResult:
    command: str
    returncode: int
    stdout: str
    stderr: str
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def check(self) -> CommandResult:
        """Raise :class:`CommandError` unless the command succeeded; return self."""
        if not self.ok:
            raise CommandError(self.command, self.returncode, self.stdout, self.stderr)
        return self


def new_tag() -> str:
    return uuid.uuid4().hex


def ssh_command_line(command: str, tag: str, sudo: bool = False) -> str:
    """The line sent over SSH: the user's login shell runs a POSIX sh with the tag set, and exits with its status.

    The login shell waits rather than execs (``; exit $?`` also keeps bash from exec'ing a lone command), so a
    command killed by a signal is reported as a shell reports it, 128 + the signal, as over the guest agent;
    SSH itself would report only the signal, which paramiko does not read.
    With ``sudo`` (a login user other than root) the shell runs as root through
    ``sudo -n``, the tag set inside, since sudo resets the environment.
    """
    if sudo:
        return f"sudo -n /usr/bin/env {TAG}={tag} /bin/sh -c {shlex.quote(command)}; exit $?"
    return f"{TAG}={tag} /bin/sh -c {shlex.quote(command)}; exit $?"


def agent_environment(tag: str, home: str = "/root", user: str = "root") -> list[str]:
    """guest-exec replaces the environment, so give it what an SSH session would have."""
    return [f"PATH={GUEST_PATH}", f"HOME={home}", f"USER={user}", f"LOGNAME={user}", "SHELL=/bin/sh", f"{TAG}={tag}"]


def agent_script(command: str) -> str:
    """Start in $HOME with umask 022 as an SSH session does (the agent daemon may have 077, and / as its cwd)."""
    return 'cd "$HOME" 2>/dev/null || :; umask 022\n' + command


def kill_script(tag: str) -> str:
    """Kill every process whose environment carries ``tag``.

    One grep over all environ files (a fork per process is slow under
    emulation); the tag is a random hex string, so a substring match is
    exact enough. Two passes catch children forked during the first.
    """
    return (
        "for pass in 1 2; do "
        f"for e in $(grep -l '{TAG}={tag}' /proc/[0-9]*/environ 2>/dev/null); do "
        'p=${e#/proc/}; kill -KILL "${p%/environ}" 2>/dev/null; done; done; true'
    )
