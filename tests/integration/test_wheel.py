"""The built wheel works on its own: installed into a fresh venv, away from the source tree."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pytest_vmfixtures.fixtures import SESSION_KEY

ROOT = Path(__file__).resolve().parents[2]

SUITE = '''
def test_from_the_wheel(vm):
    vm.run("rm -rf /etc", timeout=120)
    assert not vm.run("test -e /etc/passwd").ok  # wrecked: the next test shows the revert

def test_clean_again(vm):
    assert vm.run("test -e /etc/passwd").ok
'''


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=900, **kwargs)  # type: ignore[call-overload]
    assert result.returncode == 0, f"{argv}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result  # type: ignore[no-any-return]


def test_wheel_installs_and_runs_a_guest_test(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)])
    (wheel,) = dist.glob("pytest_vmfixtures-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pytest_vmfixtures/images/recipes/debian-12.toml" in names
    assert "pytest_vmfixtures/backends/libvirt/domain.xml" in names and "pytest_vmfixtures/py.typed" in names

    venv = tmp_path / "venv"
    _run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)])
    _run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)])
    listed = _run([str(venv / "bin" / "pytest-vmfixtures"), "images", "list"]).stdout
    assert "debian-12" in listed and "tiny" in listed

    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_user.py").write_text(SUITE)
    cache = request.config.stash[SESSION_KEY].settings.cache_dir
    result = _run([str(venv / "bin" / "pytest"), "-p", "no:cacheprovider", f"--vm-cache={cache}", "-q", str(suite)],
                  cwd=suite)
    assert "2 passed" in result.stdout
    # It ran the installed copy, not the checkout.
    origin = _run([str(venv / "bin" / "python"), "-c", "import pytest_vmfixtures; print(pytest_vmfixtures.__file__)"],
                  cwd=suite).stdout
    assert str(venv) in origin
