"""The pytest-vmfixtures command on a fake cache: list, prune, and how errors read. No image is built."""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest

from pytest_vmfixtures import cli, doctor
from pytest_vmfixtures.images.cache import Cache, image_key
from pytest_vmfixtures.images.catalog import load_recipe
from pytest_vmfixtures.runtime import _proc_start_time

RECIPE = """\
description = "A demo recipe"
distribution = "debian"
release = "bookworm"
version = "12"
architecture = "amd64"
init = "systemd"
packages = ["linux-image-cloud-amd64"]
disk_size = "1G"
kernel_cmdline = "root=/dev/vda"
"""


def fake_qcow2(path: Path, backing: Path | None) -> None:
    """Just a qcow2 header naming ``backing``, which is all prune reads."""
    name = str(backing).encode() if backing is not None else b""
    header = b"QFI\xfb" + struct.pack(">IQI", 3, 512 if name else 0, len(name))
    path.write_bytes(header.ljust(512, b"\0") + name)


def _add_entry(cache: Path, kind: str, key: str, backing: Path | None, payload: tuple[str, bytes],
               age_days: float) -> Path:
    """A cache entry as the plugin leaves it: a disk, one more file, and a manifest with its age."""
    directory = cache / f"{kind}s" / key
    directory.mkdir(parents=True)
    fake_qcow2(directory / "disk.qcow2", backing)
    (directory / payload[0]).write_bytes(payload[1])
    created = time.time() - age_days * 86400
    (directory / "manifest.json").write_text(json.dumps({"kind": kind, "created": created}))
    return directory


def add_image(cache: Path, key: str, age_days: float = 0.0) -> Path:
    return _add_entry(cache, "image", key, None, ("vmlinuz", b"k" * 5000), age_days)


def add_state(cache: Path, key: str, backing: Path, age_days: float = 0.0) -> Path:
    return _add_entry(cache, "state", key, backing, ("memory", b"m" * 10000), age_days)


@pytest.fixture
def recipes(tmp_path: Path) -> Path:
    directory = tmp_path / "recipes"
    directory.mkdir()
    (directory / "demo.toml").write_text(RECIPE)
    return directory


@pytest.fixture
def current(recipes: Path) -> str:
    return image_key("demo", load_recipe("demo", [recipes]).digest)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_shows_built_outdated_and_missing(
    tmp_path: Path, recipes: Path, current: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    built = add_image(cache, current, age_days=2)
    code, out, err = run(capsys, "images", "list", "--cache", str(cache), "--images-dir", str(recipes))
    assert (code, err) == (0, "")
    demo = next(line for line in out.splitlines() if line.startswith("demo "))
    assert demo.split()[1] == "built"
    assert "2 d" in demo and "A demo recipe" in demo
    assert str(built) in out
    assert any(line.split()[:2] == ["tiny", "-"] for line in out.splitlines())  # built-in recipes are listed too

    built.rename(cache / "images" / "demo-0000000000000000")
    _, out, _ = run(capsys, "images", "list", "--cache", str(cache), "--images-dir", str(recipes))
    assert next(line for line in out.splitlines() if line.startswith("demo ")).split()[1] == "outdated"


def test_list_reports_a_broken_recipe_in_one_line(tmp_path: Path, recipes: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (recipes / "bad.toml").write_text("distribution = [\n")
    code, out, err = run(capsys, "images", "list", "--cache", str(tmp_path / "cache"), "--images-dir", str(recipes))
    assert code == 1
    assert "bad " in out and "broken" in out
    assert err.count("\n") == 1 and err.startswith("pytest-vmfixtures: error: recipe bad:")


def test_prune_removes_what_no_current_recipe_or_image_needs(
    tmp_path: Path, recipes: Path, current: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    keep_image = add_image(cache, current)
    old_image = add_image(cache, "demo-0123456789abcdef")
    foreign = add_image(cache, "someone-else-0123456789abcdef")
    keep_state = add_state(cache, "demo-aaaa", keep_image / "disk.qcow2")
    of_old_image = add_state(cache, "demo-bbbb", old_image / "disk.qcow2")
    orphan = add_state(cache, "demo-cccc", tmp_path / "deleted" / "disk.qcow2")
    leftover = cache / "tmp" / "images--demo-1111-abcd1234"
    leftover.mkdir(parents=True)
    (leftover / "rootfs.ext2").write_bytes(b"x" * 4096)

    code, out, err = run(capsys, "images", "prune", "--cache", str(cache), "--images-dir", str(recipes))
    assert (code, err) == (0, "")
    for gone in (old_image, of_old_image, orphan, leftover):
        assert not gone.exists(), out
    for kept in (keep_image, foreign, keep_state):
        assert kept.exists(), out
    assert "built from an older demo recipe" in out
    assert "its image is gone" in out
    assert "left by an interrupted run" in out
    assert "kept images/someone-else-0123456789abcdef" in out
    assert out.splitlines()[-1].startswith("removed ") and "KiB" in out.splitlines()[-1]


def test_prune_dry_run_removes_nothing(tmp_path: Path, recipes: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    old = add_image(cache, "demo-0123456789abcdef")
    code, out, _ = run(capsys, "images", "prune", "--dry-run", "--cache", str(cache), "--images-dir", str(recipes))
    assert code == 0 and old.exists()
    assert "would remove images/demo-0123456789abcdef" in out


def test_prune_older_than_and_all(tmp_path: Path, recipes: Path, current: str, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    image = add_image(cache, current)
    fresh = add_state(cache, "demo-aaaa", image / "disk.qcow2", age_days=1)
    stale = add_state(cache, "demo-bbbb", image / "disk.qcow2", age_days=10)
    args = ["--cache", str(cache), "--images-dir", str(recipes)]
    assert run(capsys, "images", "prune", "--older-than", "7", *args)[0] == 0
    assert image.exists() and fresh.exists() and not stale.exists()

    code, out, _ = run(capsys, "images", "prune", "--all", *args)
    assert code == 0 and not image.exists() and not fresh.exists()
    assert "--all" in out


def test_prune_skips_locked_and_in_use_entries(
    tmp_path: Path, recipes: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    building = add_image(cache, "demo-0123456789abcdef")
    used = add_image(cache, "demo-fedcba9876543210")
    # A live session (this process) has a guest whose overlay sits on a state of the used image.
    state = add_state(cache, "demo-aaaa", used / "disk.qcow2", age_days=30)
    machine = cache / "run" / f"{os.getpid()}-cafecafe" / "demo-1"
    machine.mkdir(parents=True)
    start = _proc_start_time(os.getpid())
    (machine.parent / "session.json").write_text(json.dumps({"pid": os.getpid(), "start_time": start}))
    fake_qcow2(machine / "overlay.qcow2", state / "disk.qcow2")

    with Cache(cache).lock(f"images-{building.name}"):
        code, out, _ = run(capsys, "images", "prune", "--all", "--cache", str(cache), "--images-dir", str(recipes))
    assert code == 0
    assert building.exists() and f"skipped images/{building.name}" in out
    assert used.exists() and state.exists()


def test_build_unknown_image_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "images", "build", "no-such-image", "--cache", str(tmp_path))
    assert code == 1 and out == ""
    assert err.count("\n") == 1
    assert err.startswith("pytest-vmfixtures: error: unknown image 'no-such-image'; available: ")


def test_bad_older_than(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "images", "prune", "--older-than", "-1", "--cache", str(tmp_path))
    assert code == 1 and "--older-than" in err


def test_command_without_action_shows_its_usage(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "images")
    assert code == 1 and "list" in err and "prune" in err


def test_doctor_exit_status_follows_the_checks(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    checks = [doctor.Check(doctor.OK, "qemu", "fine"), doctor.Check(doctor.FAIL, "cache", "not writable")]
    monkeypatch.setattr(doctor, "run_checks", lambda *args, **kwargs: checks)
    code, out, _ = run(capsys, "doctor")
    assert code == 1
    assert "[fail] cache: not writable" in out
    monkeypatch.setattr(doctor, "run_checks", lambda *args, **kwargs: checks[:1])
    assert run(capsys, "doctor")[0] == 0


def add_cloud(cache: Path, kind: str, key: str, meta: dict[str, str], unused_days: float) -> Path:
    """A downloads or seeds entry as byo leaves it, last used ``unused_days`` ago."""
    directory = cache / kind / key
    directory.mkdir(parents=True)
    (directory / "disk.img").write_bytes(b"d" * 8192)
    (directory / "manifest.json").write_text(json.dumps({**meta, "created": time.time()}))
    when = time.time() - unused_days * 86400
    os.utime(directory, (when, when))
    return directory


def test_cloud_disks_and_seeds_are_listed_and_pruned_when_unused(
    tmp_path: Path, recipes: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    args = ["--cache", str(cache), "--images-dir", str(recipes)]
    recent = add_cloud(cache, "downloads", "a" * 64, {"kind": "download", "url": "https://example.org/x.qcow2"}, 1)
    stale = add_cloud(cache, "downloads", "b" * 64, {"kind": "copy", "source": "/srv/mine.img"}, 30)
    stale_seed = add_cloud(cache, "seeds", "c" * 32 + "-vmfix-1", {"kind": "seed", "user": "vmfix"}, 30)
    stale_vmdk = add_cloud(cache, "converted", "f" * 64 + "-vmdk", {"kind": "converted", "format": "vmdk"}, 30)
    recent_vdi = add_cloud(cache, "converted", "f" * 64 + "-vdi", {"kind": "converted", "format": "vdi"}, 1)
    on_stale = add_state(cache, "cloud-dddd", stale / "disk.img", age_days=1)
    in_use = add_cloud(cache, "downloads", "e" * 64, {"kind": "download", "url": "https://example.org/y.qcow2"}, 30)
    machine = cache / "run" / f"{os.getpid()}-cafecafe" / "cloud-1"
    machine.mkdir(parents=True)
    (machine.parent / "session.json").write_text(json.dumps({"pid": os.getpid(), "start_time": _proc_start_time(os.getpid())}))
    fake_qcow2(machine / "overlay.qcow2", in_use / "disk.img")

    code, out, _ = run(capsys, "images", "list", *args)
    assert code == 0
    listed = {line.split()[0]: line for line in out.splitlines() if line.startswith(("downloads/", "seeds/"))}
    assert len(listed) == 4, out
    assert "https://example.org/x.qcow2" in listed["downloads/" + "a" * 24] and "downloaded" in out
    assert "/srv/mine.img" in listed["downloads/" + "b" * 24] and "30 d ago" in listed["downloads/" + "b" * 24]
    assert "user vmfix" in listed["seeds/" + "c" * 24] and "KiB" in listed["seeds/" + "c" * 24]

    assert run(capsys, "images", "prune", *args)[0] == 0
    assert recent.exists() and stale.exists() and stale_seed.exists(), "without --older-than nothing cloud goes"
    code, out, _ = run(capsys, "images", "prune", "--older-than", "7", *args)
    assert code == 0
    assert not stale.exists() and not stale_seed.exists() and not on_stale.exists(), out
    assert not stale_vmdk.exists() and recent_vdi.exists(), out
    assert recent.exists() and in_use.exists(), out
    assert "not used for 7 days" in out and "its image is gone" in out
