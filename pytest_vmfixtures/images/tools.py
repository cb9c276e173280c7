"""Host programs a build runs: each with a deadline, each failure named with what to do."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence

from ..errors import ImageError

TOOL_TIMEOUT = 1200.0  # seconds for one build step (apt-get download, genext2fs, qemu-img convert, ...)


def run_tool(
    command: Sequence[str], ok: Sequence[int] = (0,), hint: str = "check the host's disk space and tools",
    timeout: float = TOOL_TIMEOUT,
) -> None:
    """Run one tool with a deadline; on failure say which, what to do, and what it printed.

    A build holds its cache lock: a tool that hangs is killed (with its children) at ``timeout``,
    so it cannot stall every worker waiting for that lock.
    """
    env = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}
    with subprocess.Popen(dying_with_us(command), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, errors="replace", env=env,
                          start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(process)
            raise ImageError(f"{command[0]} did not finish within {timeout:g} s and was killed; {hint}") from None
        except BaseException:
            kill_group(process)
            raise
    result = subprocess.CompletedProcess(list(command), process.returncode, stdout, stderr)
    if result.returncode not in ok:
        lines = (result.stderr or result.stdout).strip().splitlines()
        # apt's "E:" lines say what went wrong; otherwise the tail says where.
        shown = [line for line in lines if line.startswith("E: ")][:5] or lines[-10:]
        raise ImageError(f"{command[0]} failed (exit {result.returncode}); {hint}:\n" + "\n".join(shown))


def dying_with_us(command: Sequence[str]) -> list[str]:
    """``command`` with a parent-death signal (as every guest QEMU has): killed with pytest, however it
    ends, rather than running on for up to an hour while a retried run starts the same build."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--", *command] if setpriv else list(command)


def kill_group(process: subprocess.Popen[str]) -> None:
    """SIGKILL a tool started in its own session, and everything it started; then reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def have_tool(tool: str) -> bool:
    """Whether ``tool`` is on PATH or in the sbin directories an ordinary user's PATH may lack."""
    return shutil.which(tool) is not None or shutil.which(tool, path="/usr/sbin:/sbin") is not None
