"""The CI recipes in examples/ci pass on their first run: run here step by step, not only parsed.

The step runner (runner.py) executes each recipe's shell steps in order on this machine against a fresh
project with one guest test; the recipes' doctor lines pass on an empty cache (a first run has no cache to
restore); and the packages each recipe installs cover what doctor checks for the images it runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_vmfixtures import doctor
from pytest_vmfixtures.arch import ARCHES
from pytest_vmfixtures.fixtures import SESSION_KEY
from pytest_vmfixtures.images.catalog import load_recipe

from . import runner

GITHUB, GITLAB, SHELL = (runner.CI / name for name in ("github-actions.yml", "gitlab-ci.yml", "run-tests.sh"))
IMAGE = "debian-12"
# On every Debian system (Essential or apt itself): a recipe need not install them.
ALWAYS_THERE = {"util-linux", "apt", "dpkg"}
CLI_SHIM = "import sys; from pytest_vmfixtures.cli import main; sys.argv[0] = 'pytest-vmfixtures'; sys.exit(main())"


def matrix(recipe: Path) -> list[str]:
    if recipe == GITHUB:
        (job,) = runner.load(GITHUB)["jobs"].values()
        return list(job["strategy"]["matrix"]["image"])
    if recipe == GITLAB:
        return [image for cell in runner.load(GITLAB)["vm-tests"]["parallel"]["matrix"] for image in cell["VM_IMAGE"]]
    default = re.search(r"^VM_IMAGES=\$\{VM_IMAGES:-([^}]*)\}$", SHELL.read_text(), re.M)
    assert default, "run-tests.sh no longer sets a default VM_IMAGES"
    return default.group(1).split()


def doctor_packages(images: list[str]) -> set[str]:
    """What doctor checks for ``images`` as an ordinary user (CI runners are), as Debian packages."""
    needed = {package for package, _ in doctor.image_tool_needs(rootless=True, images=images).values()}
    for name in images:
        arch = ARCHES[load_recipe(name).architecture]
        needed |= {arch.qemu_package, *([arch.firmware_package] if arch.firmware_package else [])}
    return needed | {"qemu-system-x86", "qemu-utils"}  # check_qemu: the x86 emulator and qemu-img


@pytest.mark.parametrize("recipe", [GITHUB, GITLAB, SHELL], ids=lambda p: p.name)
def test_the_packages_a_recipe_installs_cover_what_doctor_checks_for_its_images(recipe: Path) -> None:
    installed = runner.installed_packages(runner.shell_text(recipe))
    assert installed, f"{recipe.name} installs no Debian packages (or this test no longer finds them)"
    missing = sorted(doctor_packages(matrix(recipe)) - installed - ALWAYS_THERE)
    assert not missing, f"{recipe.name} runs {matrix(recipe)} but does not install {missing}, which doctor checks for"


def test_the_package_scanner_reads_each_recipes_form() -> None:
    assert runner.installed_packages("sudo apt-get install -y -qq --no-install-recommends \\\n  qemu-utils uidmap \\\n  libc6.1+x\n") \
        == {"qemu-utils", "uidmap", "libc6.1+x"}
    assert runner.installed_packages("#   apt-get install ovmf mtools \\\n#       cpio\n# Exit status") == {"ovmf", "mtools", "cpio"}


BASE_PACKAGES = ("coreutils", "dash", "grep", "sed", "util-linux", "dpkg", "apt", "perl-base")


def packages_path(packages: set[str], where: Path) -> str:
    """A PATH with only the programs of ``packages`` (and a base system's): this host as the recipe leaves it."""
    where.mkdir()
    for package in sorted(packages | set(BASE_PACKAGES)):
        listing = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, timeout=60)
        assert listing.returncode == 0, f"this host lacks {package}, which a recipe installs: add it to scripts/bootstrap"
        for line in listing.stdout.splitlines():
            path = Path(line)
            shown = where / path.name
            if path.parent.as_posix() in ("/usr/bin", "/bin") and os.access(path, os.X_OK) and not path.is_dir() \
                    and not shown.exists():
                shown.symlink_to(path)
    return str(where)


@pytest.mark.parametrize("recipe", [GITHUB, GITLAB, SHELL], ids=lambda p: p.name)
def test_a_recipes_host_check_passes_on_a_first_run(recipe: Path, tmp_path: Path) -> None:
    """Each doctor line, as the recipe writes it: an empty cache, no KVM, only the programs of the packages
    the recipe installs on PATH (so another image's tools, arch-test or an arm64 emulator, are not there)."""
    calls = runner.doctor_calls(runner.shell_text(recipe))
    assert calls, f"{recipe.name} runs no host check"
    host_path = packages_path(runner.installed_packages(runner.shell_text(recipe)), tmp_path / "host-bin")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    wrapper = bin_dir / "pytest-vmfixtures"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -c "{CLI_SHIM}" "$@"\n')
    wrapper.chmod(0o755)
    for image in matrix(recipe):
        env = dict(os.environ, VMFX_CACHE=str(tmp_path / "empty-cache"), VM_ACCEL="auto", VM_IMAGE=image, image=image,
                   VENV=".venv", IMAGES_DIR="images", own_recipes="", PATH=f"{bin_dir}:{host_path}")
        for call in calls:
            line = runner._expressions(call, {"matrix.image": image})
            result = subprocess.run(["/bin/sh", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, f"{recipe.name} ({image}): {line}\n{result.stdout}{result.stderr}"
            assert f"checking what {image} " in result.stdout
            assert "[info] other images: missing " in result.stdout and "arch-test (for debian-12-i386)" in result.stdout


@pytest.mark.integration
@pytest.mark.parametrize("recipe", [GITHUB, GITLAB, SHELL], ids=lambda p: p.name)
def test_a_recipe_runs_green_step_by_step(recipe: Path, tmp_path: Path, dist: Path, request: pytest.FixtureRequest) -> None:
    """The recipe's steps in order (debian-12 cell, no KVM here): every step passes and the guest tests pass."""
    suite_cache = request.config.stash[SESSION_KEY].settings.cache_dir
    project = tmp_path / "project"
    env = runner.make_project(project, suite_cache)
    env["VM_ACCEL"] = "auto"  # what each recipe says to set on a runner without KVM
    if recipe == GITHUB:
        job_env, steps = runner.github_steps(recipe, IMAGE, project)
        cache = Path(job_env["VMFX_CACHE"])
    elif recipe == GITLAB:
        job_env, steps = runner.gitlab_steps(recipe, IMAGE, project)
        cache = Path(job_env["VMFX_CACHE"])
    else:
        cache = tmp_path / "runner-cache"
        job_env, steps = {"VM_IMAGES": IMAGE, "VMFX_CACHE": str(cache)}, runner.shell_steps(recipe)
        steps = [runner.Step("cache", skip="the runner's cache, kept between runs", restores_cache=True), *steps]
    job_env["VM_ACCEL"] = "auto"
    result = runner.run(steps, {**env, **job_env}, project, dist, cache, IMAGE)
    assert not result.failed, f"{recipe.name}: {result.failed} failed\n{result.output}"
    assert result.ran, f"{recipe.name}: no step ran"
    junit = sorted((project / "reports").glob("junit-*.xml"))
    assert junit, f"{recipe.name}: no JUnit report\n{result.output}"
    text = junit[0].read_text()
    assert 'tests="2"' in text and 'failures="0"' in text and 'errors="0"' in text and 'skipped="0"' in text, text[:2000]
