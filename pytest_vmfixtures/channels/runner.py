"""vmfx-runner, the host's side: how the NoCloud seed installs and starts it, and how it is reached.

Your own image's guests get a virtio-serial port named :data:`PORT_NAME` beside
the guest agent's. The seed writes the runner (:mod:`.guest_runner`, run by the
guest's Python 3) to :data:`GUEST_PATH` and starts it as root, unless the image
has qemu-guest-agent, which is then preferred. The runner speaks the agent's
protocol for the commands ``vm.run`` uses, so the host drives it with the
agent's client (:class:`.agent.Agent` named :data:`WHAT`): what ``vm.run``
does (shell, environment, $HOME and umask, kill by tag, output caps) is the
same code for both.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from .guest_runner import PORT_NAME

__all__ = ["GUEST_PATH", "PORT_NAME", "WHAT", "cloud_config", "start_script"]

WHAT = "vmfx-runner"  # how messages name it
GUEST_PATH = "/usr/local/lib/pytest-vmfixtures/vmfx-runner.py"
UNIT = "vmfx-runner"
# Where an image keeps qemu-guest-agent: with it installed, the agent is preferred and no runner starts.
AGENT_BINARIES = ("/usr/bin/qemu-ga", "/usr/sbin/qemu-ga", "/usr/local/bin/qemu-ga", "/usr/local/sbin/qemu-ga")


def program() -> str:
    """The runner's source, as the guest runs it."""
    return resources.files(__package__).joinpath("guest_runner.py").read_text(encoding="utf-8")


def start_script() -> str:
    """Start the runner as root: a systemd service that comes back if killed, else a session of its own.

    Nothing starts where qemu-guest-agent is installed or no Python 3 is found (commands then go through
    the agent, or SSH). ``-I -S``: no user site, environment or site packages reach it.
    """
    agents = " ".join(AGENT_BINARIES)
    return (
        f"for ga in {agents}; do [ -x \"$ga\" ] && exit 0; done; "
        "py=$(command -v python3 || command -v /usr/libexec/platform-python) || exit 0; "
        "if [ -d /run/systemd/system ] && command -v systemd-run >/dev/null; then "
        f"exec systemd-run --quiet --unit={UNIT} --property=Restart=always --property=RestartSec=1 "
        f"\"$py\" -I -S {GUEST_PATH}; fi; "
        f"setsid \"$py\" -I -S {GUEST_PATH} </dev/null >/dev/null 2>&1 &"
    )


def cloud_config() -> dict[str, Any]:
    """The ``#cloud-config`` keys that install and start the runner (root's alone: mode 0700)."""
    return {
        "write_files": [{"path": GUEST_PATH, "content": program(), "owner": "root:root", "permissions": "0700"}],
        "runcmd": [["sh", "-c", start_script()]],
    }
