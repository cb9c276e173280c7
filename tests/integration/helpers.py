"""Helpers for tests that run pytest in a subprocess and count what it left behind."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path


def qemu_processes(marker: str) -> list[int]:
    """Pids of live QEMU processes whose command line mentions ``marker``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if "qemu-system" in cmdline and marker in cmdline and state != "Z":
            found.append(int(proc.name))
    return found


def plugin_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTEST_XDIST_WORKER", None)
    return env


def orphaned_qemu() -> list[int]:
    """QEMU processes of sessions whose pytest process is gone (session dirs are named <pid>-<id>)."""
    orphans = []
    for pid in qemu_processes("/run/"):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        match = re.search(r"/run/(\d+)-[0-9a-f]{8}/", cmdline)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            orphans.append(pid)
    return orphans


def default_signals() -> None:
    """preexec_fn for a child a test will signal: SIGINT and SIGQUIT back to their default disposition.

    A job started in the background by a non-interactive shell (``scripts/test &``, as some CI runners
    start jobs) inherits SIGINT and SIGQUIT as ignored, and so would the child: Python then never raises
    KeyboardInterrupt in it, and a test that sends SIGINT would wait for nothing.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
