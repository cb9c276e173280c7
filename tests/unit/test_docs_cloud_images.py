"""docs/cloud-images.md's commands run, against files made here in the vendors' names and formats.

The vendors' real files need the internet; what can be checked here is that each command, as
written, does what the page says with a file of that name and format: a checksum list in the
vendor's layout, a qcow2 named ``.img``, an xz-compressed qcow2, a VHDX. A command that is
mistyped, or a checksum layout the tool does not read, fails the test.
"""

from __future__ import annotations

import hashlib
import lzma
import re
import shutil
import subprocess
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "cloud-images.md"
_BLOCK_RE = re.compile(r"^```(\w+)\n(.*?)^```", re.M | re.S)
_FILE_RE = re.compile(r"[\w.-]+\.(?:qcow2\.xz|qcow2\.sha512|qcow2|img|vhdx)\b|SHA256SUMS|SHA512SUMS|[\w.-]+-CHECKSUM")

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed (qemu-utils)")


def blocks(language: str) -> list[str]:
    return [body for lang, body in _BLOCK_RE.findall(DOC.read_text()) if lang == language]


def _qemu_img_create(path: Path, fmt: str) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), "16M"], check=True)


def _digest(path: Path, algorithm: str) -> str:
    return hashlib.new(algorithm, path.read_bytes()).hexdigest()


def _disk(directory: Path, name: str) -> Path:
    """A small disk of that name: a qcow2 (whatever the suffix says, as vendors do), or a VHDX."""
    path = directory / name
    if not path.exists():
        _qemu_img_create(path, "vhdx" if name.endswith(".vhdx") else "qcow2")
    return path


def _disks_named(text: str) -> list[str]:
    return sorted({n for n in _FILE_RE.findall(text) if n.endswith((".qcow2", ".img"))})


def make_inputs(directory: Path, script: str, page: str) -> None:
    """Each file the script reads, in the layout its vendor publishes, covering the disks the page names."""
    names = sorted(set(_FILE_RE.findall(script)))
    # What the script writes itself: a decompressed file, a conversion's output.
    outputs = {n.removesuffix(".xz") for n in names if n.endswith(".xz")}
    outputs |= set(re.findall(r"^qemu-img convert .* (\S+)$", script, re.M))
    for name in names:
        if name.endswith(".qcow2.xz"):
            plain = directory / "plain.qcow2"
            _qemu_img_create(plain, "qcow2")
            (directory / name).write_bytes(lzma.compress(plain.read_bytes()))
            plain.unlink()
        elif name.endswith(".qcow2.sha512"):  # Alpine: one file per image, "digest  name"
            disk = _disk(directory, name.removesuffix(".sha512"))
            (directory / name).write_text(f"{_digest(disk, 'sha512')}  {disk.name}\n")
        elif name == "SHA256SUMS":  # Ubuntu: binary-mode lines, more files than you downloaded
            lines = [f"{_digest(_disk(directory, d), 'sha256')} *{d}" for d in _disks_named(page) if d.startswith("ubuntu")]
            (directory / name).write_text("\n".join([*lines, f"{'0' * 64} *ubuntu-not-downloaded.img"]) + "\n")
        elif name == "SHA512SUMS":  # Debian: text-mode lines, more files than you downloaded
            lines = [f"{_digest(_disk(directory, d), 'sha512')}  {d}" for d in _disks_named(page) if d.startswith("debian")]
            (directory / name).write_text("\n".join([*lines, f"{'0' * 128}  debian-not-downloaded.raw"]) + "\n")
        elif name.endswith("-CHECKSUM"):  # Fedora: signed, BSD-style "SHA256 (name) = digest" lines
            lines = [f"SHA256 ({d}) = {_digest(_disk(directory, d), 'sha256')}" for d in _disks_named(page) if d.startswith("Fedora")]
            signed = ["-----BEGIN PGP SIGNED MESSAGE-----", "Hash: SHA256", "", "# Fedora-Cloud-Base-Generic qcow2",
                      *lines, "-----BEGIN PGP SIGNATURE-----", "", "iQIzBAEBCAAdFiEE", "-----END PGP SIGNATURE-----"]
            (directory / name).write_text("\n".join(signed) + "\n")
        elif name not in outputs:
            _disk(directory, name)


def test_every_distribution_has_its_section() -> None:
    headings = re.findall(r"^### (\w+)", DOC.read_text(), re.M)
    assert headings[-6:] == ["Ubuntu", "Debian", "Fedora", "Alpine", "FreeBSD", "Windows"]


@pytest.mark.parametrize("script", blocks("sh"), ids=lambda s: s.split()[0] + "-" + s.split()[-1][:24])
def test_the_pages_commands_run(script: str, tmp_path: Path) -> None:
    make_inputs(tmp_path, script, DOC.read_text())
    result = subprocess.run(["sh", "-eu", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{script}\n{result.stdout}\n{result.stderr}"
    out = result.stdout
    for disk in re.findall(r"^sha256sum ([\w.-]+)$", script, re.M):  # the digest printed is the one for sha256=
        assert f"{_digest(tmp_path / disk, 'sha256')}  {disk}" in out
    if "--check" in script:
        assert ": OK" in out and "FAILED" not in out
    if "qemu-img info" in script:
        assert "file format: qcow2" in out
    if "qemu-img convert" in script:
        target = script.split()[-1]
        info = subprocess.run(["qemu-img", "info", str(tmp_path / target)], capture_output=True, text=True, check=True)
        assert "file format: qcow2" in info.stdout


@pytest.mark.parametrize("example", blocks("python"), ids=lambda s: s.strip().splitlines()[-1][:30])
def test_the_pages_python_compiles(example: str) -> None:
    compile(example, str(DOC), "exec")


def test_no_block_is_left_unchecked() -> None:
    """Every code block on the page is a language checked above (or plain text)."""
    languages = {lang for lang, _ in _BLOCK_RE.findall(DOC.read_text())}
    assert languages <= {"sh", "python", "text"}
