"""A guest's console log as a text file: its last lines, for error messages and reports (a leaf)."""

from __future__ import annotations

from pathlib import Path

CONSOLE_TAIL_LINES = 50


def console_tail(path: Path, lines: int = CONSOLE_TAIL_LINES) -> str:
    try:
        data = path.read_bytes()[-64 * 1024 :]
    except OSError:
        return "(no console log)"
    text = data.decode("utf-8", errors="replace").replace("\r", "")
    return "\n".join(text.splitlines()[-lines:])
