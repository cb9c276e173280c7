"""The whole path as an ordinary user: image build (rootless mmdebstrap), boot, revert.

CI runs as root and names an ordinary user (in the kvm group, with subuid and
subgid ranges, as useradd makes them) in VMFIX_TEST_USER; this test then runs
a small suite as that user with a cache of the user's own, so nothing can be
borrowed from root's cache.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

import pytest_vmfixtures
from pytest_vmfixtures.fixtures import SESSION_KEY
from pytest_vmfixtures.images import foreign

from . import cloudimage

USER = os.environ.get("VMFIX_TEST_USER", "")

pytestmark = pytest.mark.skipif(
    not USER or os.geteuid() != 0,
    reason="set VMFIX_TEST_USER to an ordinary user and run as root (CI does) to test the non-root path",
)

SUITE = '''
def test_wreck(vm):
    assert vm.run("id -u", check=True).stdout.strip() == "0"
    vm.run("rm -rf /etc", timeout=120)
    assert not vm.run("test -e /etc/passwd").ok  # wrecked: the next test shows the revert

def test_clean_again(vm):
    assert vm.run("test -e /etc/passwd").ok
    # Files in the image keep their real owners although no root built it.
    assert vm.run("stat -c %u:%g /etc/shadow", check=True).stdout.strip() == "0:42"
'''


def _as_user(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {"HOME": pwd.getpwnam(USER).pw_dir, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    env.update(kwargs.pop("env", {}))  # type: ignore[arg-type]
    return subprocess.run(["runuser", "-u", USER, "--", *argv], env=env, text=True, capture_output=True, **kwargs)  # type: ignore[call-overload]


def _user_setup(extra_packages: tuple[str, ...] = ()) -> tuple[Path, Path, Path, Path]:
    """The user's copy of the package, the suite, and a venv of the user's own: (home, source, suite, venv)."""
    home = Path(pwd.getpwnam(USER).pw_dir)
    entry = pwd.getpwnam(USER)
    # The checkout may sit where the user cannot read it: give the user a copy of the package.
    shared = home / "vmfixtures-test"
    shutil.rmtree(shared, ignore_errors=True)
    shared.mkdir()
    source = shared / "src"
    shutil.copytree(Path(pytest_vmfixtures.__file__).parent, source / "pytest_vmfixtures",
                    ignore=shutil.ignore_patterns("__pycache__"))
    suite = shared / "suite"
    suite.mkdir()
    (suite / "test_as_user.py").write_text(SUITE)
    for path in [shared, *shared.rglob("*")]:
        os.chown(path, entry.pw_uid, entry.pw_gid)

    venv = home / ".cache" / "vmfixtures-test-venv"
    if not (venv / "bin" / "python").exists():
        made = _as_user(["/usr/bin/python3", "-m", "venv", str(venv)])
        assert made.returncode == 0, made.stderr
        deps = _as_user([str(venv / "bin" / "pip"), "install", "-q", "pytest", "paramiko", "qemu.qmp", "pluggy"])
        assert deps.returncode == 0, deps.stderr[-2000:]
    if extra_packages:
        deps = _as_user([str(venv / "bin" / "pip"), "install", "-q", *extra_packages], timeout=900)
        assert deps.returncode == 0, deps.stderr[-2000:]
    return home, source, suite, venv


def test_build_boot_and_revert_as_ordinary_user() -> None:
    home, source, suite, venv = _user_setup()
    entry = pwd.getpwnam(USER)
    result = _as_user(
        [str(venv / "bin" / "python"), "-m", "pytest", "-p", "pytest_vmfixtures.plugin", "-p", "no:cacheprovider",
         "-v", "--vm-cache", str(home / ".cache" / "pytest-vmfixtures"), str(suite)],
        env={"PYTHONPATH": str(source)},
        cwd=suite,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "2 passed" in result.stdout
    images = list((home / ".cache" / "pytest-vmfixtures" / "images").glob("debian-12-*/disk.qcow2"))
    assert images and all(p.stat().st_uid == entry.pw_uid for p in images)


@pytest.mark.skipif(shutil.which("libvirtd") is None, reason="libvirt is not installed")
def test_libvirt_backend_as_ordinary_user() -> None:
    """The user's own libvirtd (qemu:///session): no root, no group, QEMU and every file the user's."""
    home, source, suite, venv = _user_setup(("libvirt-python",))
    _passes_on_session_libvirt(venv, source, suite, home / ".cache" / "pytest-vmfixtures")


def _passes_on_session_libvirt(venv: Path, source: Path, suite: Path, cache: Path) -> None:
    """The user's suite passes (two tests) on the user's own libvirtd, which has no domain left after it."""
    result = _as_user(
        [str(venv / "bin" / "python"), "-m", "pytest", "-p", "pytest_vmfixtures.plugin", "-p", "no:cacheprovider",
         "-v", "--vm-cache", str(cache), "--vm-backend", "libvirt", "--vm-libvirt-uri", "qemu:///session", str(suite)],
        env={"PYTHONPATH": str(source)},
        cwd=suite,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "2 passed" in result.stdout and "backend libvirt qemu:///session" in result.stdout
    left = _as_user(["virsh", "-q", "-c", "qemu:///session", "list", "--all", "--name"])
    assert left.returncode == 0 and left.stdout.strip() == "", left.stdout + left.stderr


CLOUD_SUITE = '''
import os

import pytest

DISK = os.path.expanduser("~/vmfixtures-test/debian-12-uefi-cloud.qcow2")


@pytest.fixture
def cloud(vm_factory):
    return vm_factory(image=DISK, memory_mb=1024)


def test_wreck(cloud):
    assert cloud.built_image.firmware == "uefi"
    assert cloud.run("id -u; test -d /sys/firmware/efi && echo efi", check=True).stdout.split() == ["0", "efi"]
    cloud.run("touch /root/dirty", check=True)


def test_clean_again(cloud):
    assert cloud.run("test ! -e /root/dirty").ok
'''


@pytest.mark.skipif(shutil.which("libvirtd") is None, reason="libvirt is not installed")
def test_cloud_image_on_libvirt_as_ordinary_user(request: pytest.FixtureRequest) -> None:
    """Your own UEFI cloud image through the user's own libvirtd: seed, NVRAM and saved state the user's."""
    if cloudimage.missing_tools():
        pytest.skip(f"building the test cloud image needs: {', '.join(cloudimage.missing_tools())}")
    disk = cloudimage.ensure(request.config.stash[SESSION_KEY].cache)  # built once, here, as root
    home, source, suite, venv = _user_setup(("libvirt-python", "pycdlib"))
    entry = pwd.getpwnam(USER)
    (suite / "test_as_user.py").write_text(CLOUD_SUITE)
    copy = suite.parent / disk.name
    shutil.copyfile(disk, copy)
    for path in (copy, suite / "test_as_user.py"):
        os.chown(path, entry.pw_uid, entry.pw_gid)
    cache = home / ".cache" / "pytest-vmfixtures"
    _passes_on_session_libvirt(venv, source, suite, cache)
    nvrams = list((cache / "states").glob("debian-12-uefi-cloud*/nvram.qcow2"))
    assert nvrams and all(p.stat().st_uid == entry.pw_uid and not p.stat().st_mode & 0o077 for p in nvrams)
    assert not list((cache / "run").glob("*/*/nvram.qcow2"))  # no guest's NVRAM outlives the run

FOREIGN_FIRST_STAGE = '''
import sys
from pathlib import Path

from pytest_vmfixtures.images import foreign, mmdebstrap
from pytest_vmfixtures.images.builder import finish_filesystem
from pytest_vmfixtures.images.catalog import load_recipe
from pytest_vmfixtures.images.keys import public_line, write_keys

work = Path(sys.argv[1])
recipe = load_recipe("debian-12-arm64")
stage, host, raw = work / "stage", work / "stage" / "foreign" / "host", work / "root.ext2"
host.mkdir(parents=True)
client, host_key = write_keys(work)
archive = mmdebstrap.write_stage(recipe, stage, host_key, public_line(client),
                                 extra={foreign.STAGE2_NAME: (foreign.stage2_script(recipe), 0o755)})
mmdebstrap.run(recipe, foreign.extract_command(recipe, archive, raw, host), lambda line: None)
finish_filesystem(raw, recipe.disk_size_bytes)
kernel, cpio = foreign.initramfs(host)
print("kernel", kernel.name, "initramfs", len(cpio))
'''


def _debugfs(image: Path, request: str) -> str:
    done = subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True, text=True, check=True)
    return done.stdout + done.stderr  # debugfs reports a missing path on stderr and exits 0


def test_foreign_first_stage_as_ordinary_user() -> None:
    """What a foreign build does on the host (unpack, no emulation), done without root: files keep real owners.

    The second stage is QEMU run as the same user on the files made here; it is run whole, as root,
    by the arm64 run of scripts/test.
    """
    home, source, suite, venv = _user_setup()
    work = home / "foreign-first-stage"
    shutil.rmtree(work, ignore_errors=True)
    script = suite / "first_stage.py"
    script.write_text(FOREIGN_FIRST_STAGE)
    made = _as_user(["/usr/bin/mkdir", "-p", str(work)])
    assert made.returncode == 0, made.stderr
    result = _as_user([str(venv / "bin" / "python"), str(script), str(work)], env={"PYTHONPATH": str(source)},
                      cwd=suite, timeout=1800)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "kernel vmlinuz-" in result.stdout
    raw = work / "root.ext2"
    assert raw.stat().st_uid == pwd.getpwnam(USER).pw_uid
    # Unpacked files belong to their packages' owners, not to the user who built them (chage: root:shadow, setgid).
    chage = _debugfs(raw, "stat /usr/bin/chage")
    assert "User:     0   Group:    42" in chage and "Mode:  02755" in chage, chage
    assert "Type: symlink" in _debugfs(raw, "stat /bin")  # merged /usr, set up before unpacking
    assert "Mode:  0755" in _debugfs(raw, f"stat /var/tmp/vmfixtures/{foreign.STAGE2_NAME}")
    assert ".deb" in _debugfs(raw, "ls /var/cache/apt/archives")  # kept for the second stage
    shutil.rmtree(work, ignore_errors=True)
