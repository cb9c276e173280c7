"""Ready for PyPI: the distributions build and pass twine's check, the version is the same everywhere,
and the README (PyPI's project page) links only to absolute addresses of files that exist."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest_vmfixtures

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_distributions_build_and_pass_twine_check(dist: Path) -> None:
    files = sorted(dist.iterdir())
    version = PROJECT["version"]
    assert {p.name for p in files} == {f"pytest_vmfixtures-{version}.tar.gz", f"pytest_vmfixtures-{version}-py3-none-any.whl"}
    result = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *map(str, files)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_one_version_everywhere() -> None:
    version = PROJECT["version"]
    assert pytest_vmfixtures.__version__ == version
    top = re.search(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert top and top.group(1) == version, f"CHANGELOG.md's first section should be {version}"


def test_the_readme_links_are_absolute_and_point_at_files_that_exist() -> None:
    base = PROJECT["urls"]["Repository"].rstrip("/") + "/blob/main/"
    links = re.findall(r"\]\(([^)]+)\)", (ROOT / "README.md").read_text())
    assert links, "the README links nowhere"
    for link in links:
        assert re.match(r"https?://", link), f"README.md links to {link!r}: PyPI shows the README away from the repository; use {base}..."
        if link.startswith(base):
            path = link[len(base):].split("#")[0]
            assert (ROOT / path).exists(), f"README.md links to {path}, which does not exist"
    for name in ("CHANGELOG.md", "LICENSE"):
        assert base + name in links, f"README.md should link {name}"
