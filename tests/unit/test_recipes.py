"""The catalog: shipped recipes load with the facts tests rely on; extends, exclude_packages, builder."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_vmfixtures.errors import ImageError
from pytest_vmfixtures.images.catalog import BUILTIN_IMAGES_DIR, available_recipes, load_recipe

BASE = """\
distribution = "debian"
release = "bookworm"
version = "12"
architecture = "amd64"
init = "systemd"
packages = ["linux-image-cloud-amd64", "systemd-sysv", "openssh-server"]
disk_size = "1G"
kernel_cmdline = "root=/dev/vda"
"""


def write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(exist_ok=True)
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path


def test_shipped_catalog() -> None:
    names = set(available_recipes())
    assert {"debian-12", "debian-13", "debian-12-sysv", "debian-12-i386", "tiny"} <= names
    facts = {name: load_recipe(name) for name in names}
    for recipe in facts.values():
        assert recipe.description, f"{recipe.name} needs a description: images list shows it"
    i386 = facts["debian-12-i386"]
    assert (i386.architecture, i386.version, i386.init) == ("i386", "12", "systemd")
    assert "linux-image-686" in i386.packages and "linux-image-cloud-amd64" not in i386.packages
    assert i386.extra_sources == ("deb http://deb.debian.org/debian bookworm-updates main",)  # no security suite: see the recipe
    sysv = facts["debian-12-sysv"]
    assert sysv.init == "sysvinit" and "sysvinit-core" in sysv.packages and "systemd-sysv" not in sysv.packages
    assert "net.ifnames=0" in sysv.kernel_cmdline  # /etc/network/interfaces names eth0
    assert facts["debian-13"].release == "trixie" and not any("bookworm" in s for s in facts["debian-13"].extra_sources)
    tiny = facts["tiny"]
    assert (tiny.builder, tiny.init, tiny.distribution, tiny.commands) == ("extract", "busybox", "tiny", ())


def test_exclude_packages_drops_a_parents_package(tmp_path: Path) -> None:
    write(tmp_path, "base", BASE)
    write(tmp_path, "child", 'extends = "base"\nexclude_packages = ["systemd-sysv"]\npackages = ["sysvinit-core"]\n')
    child = load_recipe("child", [tmp_path])
    assert child.packages == ("linux-image-cloud-amd64", "openssh-server", "sysvinit-core")


def test_new_keys_leave_existing_digests_alone(tmp_path: Path) -> None:
    """Images built before builder and exclude_packages existed keep their cache key."""
    write(tmp_path, "base", BASE)
    write(tmp_path, "same", 'extends = "base"\nexclude_packages = []\nbuilder = "mmdebstrap"\n')
    base, same = load_recipe("base", [tmp_path]), load_recipe("same", [tmp_path])
    assert "builder" not in base.canonical()
    assert {**same.canonical(), "name": "base"} == base.canonical()


def test_extract_builder_is_in_the_digest(tmp_path: Path) -> None:
    tiny = BASE.replace('init = "systemd"', 'init = "busybox"\nbuilder = "extract"')
    write(tmp_path, "tiny", tiny)
    assert load_recipe("tiny", [tmp_path]).canonical()["builder"][0] == "extract"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ('init = "systemd"\nbuilder = "debootstrap"', "builder 'debootstrap' is not one of mmdebstrap, extract"),
        ('init = "systemd"\nbuilder = "extract"', 'init "busybox" goes with builder "extract"'),
        ('init = "busybox"', 'init "busybox" goes with builder "extract"'),
        ('init = "busybox"\nbuilder = "extract"\ncommands = ["true"]', "the extract builder runs no commands"),
        ('init = "systemd"\nexclude_packages = 1', "'exclude_packages' must be a list of strings"),
    ],
)
def test_bad_builder_settings(tmp_path: Path, settings: str, message: str) -> None:
    without_init = "".join(line for line in BASE.splitlines(keepends=True) if not line.startswith("init"))
    write(tmp_path, "bad", without_init + settings + "\n")
    with pytest.raises(ImageError, match=message):
        load_recipe("bad", [tmp_path])


def test_builtin_dir_is_the_package_images_dir() -> None:
    assert (BUILTIN_IMAGES_DIR / "tiny.toml").is_file()
