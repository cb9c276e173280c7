"""Text put into libvirt's XML: one escaper for values, one loader for the templates shipped beside it."""

from __future__ import annotations

import functools
from pathlib import Path
from xml.sax.saxutils import escape

from ...errors import GuestError

_QUOTES = {"'": "&apos;", '"': "&quot;"}


def attr(value: object) -> str:
    """A value for an XML attribute, quoted with ' or " (both escaped, with &, < and >)."""
    return escape(str(value), _QUOTES)


def text(value: object) -> str:
    """A value as an element's text (&, < and > escaped)."""
    return escape(str(value))


@functools.cache
def template_text(path: Path) -> str:
    """A template's text, read once; a missing one means a broken installation."""
    try:
        return path.read_text()
    except OSError as exc:
        raise GuestError(f"the libvirt domain template {path} is missing (broken installation)") from exc
