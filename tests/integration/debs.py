"""Small .deb packages built on the host for the guests (which have no network): dpkg-deb, no root."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def build_deb(directory: Path, name: str, version: str = "1.0", files: dict[str, str] | None = None,
              postinst: str = "", postrm: str = "") -> Path:
    """A binary package ``name`` with ``files`` (guest path -> text) and maintainer scripts; returns its path."""
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed (Debian: apt install dpkg)")
    root = directory / f"{name}-{version}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: vmfixtures tests <tests@localhost>\n"
        f"Description: test package {name}\n"
    )
    for script, body in (("postinst", postinst), ("postrm", postrm)):
        if body:
            path = root / "DEBIAN" / script
            path.write_text("#!/bin/sh\nset -e\n" + body + "\n")
            path.chmod(0o755)
    for guest_path, text in (files or {}).items():
        path = root / guest_path.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    deb = directory / f"{name}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(deb)],
                   check=True, capture_output=True, timeout=120)
    return deb
