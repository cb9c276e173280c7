"""Every Debian package the product asks for is one scripts/bootstrap installs.

The needs are derived from the code, not listed twice: each built-in recipe's build tools (as the
builder checks them before a build) and every "apt install ..." a message of the package tells a user
to run. A new recipe or backend that needs a new package fails here until the bootstrap has it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from pytest_vmfixtures import doctor
from pytest_vmfixtures.images.builder import host_tools
from pytest_vmfixtures.images.catalog import available_recipes, load_recipe

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIR = ROOT / "pytest_vmfixtures"


def bootstrap_packages() -> set[str]:
    match = re.search(r'^PACKAGES="([^"]*)"', (ROOT / "scripts" / "bootstrap").read_text(), re.MULTILINE)
    assert match, "scripts/bootstrap has no PACKAGES=\"...\" line"
    return set(match.group(1).split())


@pytest.mark.parametrize("name", sorted(available_recipes()))
def test_each_recipes_build_tools_come_from_bootstrapped_packages(name: str) -> None:
    packages = {package for package in host_tools(load_recipe(name), rootless=True).values()}
    assert packages <= bootstrap_packages(), f"{name} needs {sorted(packages - bootstrap_packages())}"


def test_a_foreign_architecture_needs_arch_test() -> None:
    assert host_tools(load_recipe("debian-12-i386")).get("arch-test") == "arch-test"
    assert "arch-test" not in host_tools(load_recipe("debian-12"))


def test_every_package_a_message_names_is_bootstrapped() -> None:
    named: dict[str, str] = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        for match in re.finditer(r"apt(?:-get)? install ((?:[a-z0-9][a-z0-9.+-]+ ?)+)", path.read_text()):
            for package in match.group(1).split():
                named.setdefault(package, str(path.relative_to(ROOT)))
    assert len(named) >= 5, named  # the scan found the messages (qemu, ovmf, mmdebstrap, ...)
    missing = {package: where for package, where in named.items() if package not in bootstrap_packages()}
    assert not missing, f"named in messages but not installed by scripts/bootstrap: {missing}"


def test_doctor_names_a_missing_build_tool_the_recipe_and_the_package(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_which = doctor.shutil.which
    monkeypatch.setattr(doctor.shutil, "which", lambda tool, path=None: None if tool == "arch-test" else real_which(tool))
    [check, *_] = doctor.check_image_tools(tmp_path, versions=False, images=["debian-12-i386"])
    assert check.status == doctor.FAIL
    assert "arch-test (for debian-12-i386)" in check.message and "apt install arch-test" in check.message


def test_another_images_missing_tool_is_information_not_a_problem(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A debian-12 run does not need what builds i386 or arm64 images: listed, but the check passes."""
    real_which = doctor.shutil.which
    lacking = {"arch-test", "qemu-system-aarch64"}
    monkeypatch.setattr(doctor.shutil, "which", lambda tool, path=None: None if tool in lacking else real_which(tool))
    checks = doctor.check_image_tools(tmp_path, versions=False, images=["debian-12"])
    assert [c.status for c in checks if c.name == "image build"] == [doctor.OK]
    [other] = [c for c in checks if c.name == "other images"]
    assert other.status == doctor.INFO and "arch-test (for debian-12-i386)" in other.message
    assert "qemu-system-aarch64 (for debian-12-arm64, debian-13-arm64)" in other.message
    assert "host check" in doctor.summary(checks) and "problem" not in doctor.summary(checks)


def test_an_arm64_run_fails_without_the_arm64_emulator_and_an_x86_run_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = doctor.shutil.which
    monkeypatch.setattr(doctor.shutil, "which", lambda tool, path=None: None if tool == "qemu-system-aarch64" else real_which(tool))
    arm = doctor.check_arches("tcg", doctor.image_arches(["debian-12-arm64"]))
    assert [c.status for c in arm] == [doctor.OK, doctor.FAIL] and "apt install qemu-system-arm" in arm[1].message
    x86 = doctor.check_arches("tcg", doctor.image_arches(["debian-12"]))
    assert [c.status for c in x86] == [doctor.OK, doctor.INFO] and "arm64" in x86[1].message


# What the project's own tests run on the host besides the product's needs: the tools that build the
# test cloud images (tests/integration/cloudimage.py) and libvirt's schema check of the domain XML.
TEST_TOOLS = {"virt-xml-validate": "libvirt-clients", "xmllint": "libxml2-utils",
              "chromium": "chromium", "chromedriver": "chromium-driver"}  # the HTML report check


def test_the_test_trees_tools_come_from_bootstrapped_packages() -> None:
    source = ast.parse((ROOT / "tests" / "integration" / "cloudimage.py").read_text())
    [tools] = [ast.literal_eval(node.value) for node in source.body
               if isinstance(node, ast.Assign) and [getattr(t, "id", "") for t in node.targets] == ["TOOLS"]]
    needed = {**tools, **TEST_TOOLS}
    missing = {tool: package for tool, package in needed.items() if package not in bootstrap_packages()}
    assert not missing, f"tools the tests run, from packages scripts/bootstrap does not install: {missing}"
