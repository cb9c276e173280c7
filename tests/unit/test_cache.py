"""cache: entries appear once, atomically, read-only, verified; damage is rebuilt; errors say what to pass."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pytest_vmfixtures.errors import ImageError
from pytest_vmfixtures.images.cache import STAMP, Cache, default_cache_dir, remove_tree, sha256_file

FILES = ["disk.img", "kernel"]


def make_create(calls: list[Path], payload: bytes = b"disk contents " * 1000):
    def create(directory: Path) -> None:
        calls.append(directory)
        (directory / "disk.img").write_bytes(payload)
        (directory / "kernel").write_bytes(b"\x7fELF kernel")
        Cache(directory.parent.parent).write_manifest(directory, {"kind": "test"}, FILES)

    return create


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    c = Cache(tmp_path / "cache")
    c.ensure_writable()
    return c


def test_default_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "pytest-vmfixtures"


def test_entry_creates_once(cache: Cache) -> None:
    calls: list[Path] = []
    first = cache.entry("images", "k1", make_create(calls), Cache.check_manifest)
    assert first == cache.root / "images" / "k1"
    assert (first / "disk.img").read_bytes().startswith(b"disk contents")
    assert len(calls) == 1
    assert calls[0] != first and calls[0].parent == cache.root / "tmp"  # built aside, renamed into place

    second = cache.entry("images", "k1", make_create(calls), Cache.check_manifest)
    assert second == first
    assert len(calls) == 1
    # another process (a fresh Cache) verifies the entry and also does not create it again
    third = Cache(cache.root).entry("images", "k1", make_create(calls), Cache.check_manifest)
    assert third == first
    assert len(calls) == 1
    assert list((cache.root / "tmp").iterdir()) == []


def test_different_keys_are_different_entries(cache: Cache) -> None:
    calls: list[Path] = []
    a = cache.entry("images", "a", make_create(calls), Cache.check_manifest)
    b = cache.entry("states", "a", make_create(calls), Cache.check_manifest)
    c = cache.entry("images", "c", make_create(calls), Cache.check_manifest)
    assert len({a, b, c}) == 3
    assert len(calls) == 3


def test_failing_create_leaves_no_entry_and_no_tmp(cache: Cache) -> None:
    def create(directory: Path) -> None:
        (directory / "half").write_bytes(b"x" * 100)
        (directory / "half").chmod(0o444)
        (directory / "sub").mkdir()
        (directory / "sub" / "deeper").write_bytes(b"y")
        raise RuntimeError("download failed")

    with pytest.raises(RuntimeError, match="download failed"):
        cache.entry("images", "bad", create, Cache.check_manifest)
    assert not (cache.root / "images" / "bad").exists()
    assert list((cache.root / "tmp").iterdir()) == []

    # and the next attempt creates it properly
    calls: list[Path] = []
    assert cache.entry("images", "bad", make_create(calls), Cache.check_manifest).is_dir()
    assert len(calls) == 1


def test_create_that_fails_its_own_check_leaves_nothing(cache: Cache) -> None:
    def create(directory: Path) -> None:
        (directory / "disk.img").write_bytes(b"no manifest written")

    with pytest.raises(ImageError, match="new cache entry nomanifest failed its own check: manifest missing"):
        cache.entry("images", "nomanifest", create, Cache.check_manifest)
    assert not (cache.root / "images" / "nomanifest").exists()
    assert list((cache.root / "tmp").iterdir()) == []


def test_keyboard_interrupt_in_create_also_cleans_up(cache: Cache) -> None:
    def create(directory: Path) -> None:
        (directory / "partial").write_bytes(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.entry("images", "int", create, Cache.check_manifest)
    assert not (cache.root / "images" / "int").exists()
    assert list((cache.root / "tmp").iterdir()) == []


def _flip_byte(path: Path, offset: int) -> None:
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _delete(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p: _flip_byte(p / "disk.img", 5000), "disk.img does not match its digest"),
        (lambda p: _flip_byte(p / "kernel", 0), "kernel does not match its digest"),
        (lambda p: _truncate(p / "disk.img"), "disk.img does not match its digest"),
        (lambda p: _delete(p / "kernel"), "kernel missing"),
        (lambda p: (p / "manifest.json").write_text("{ torn"), "manifest missing or unreadable"),
        (lambda p: _delete(p / "manifest.json"), "manifest missing or unreadable"),
    ],
    ids=["flip-disk", "flip-kernel", "truncate", "delete-file", "torn-manifest", "no-manifest"],
)
def test_damaged_entry_is_detected_and_made_again(cache: Cache, damage, reason: str) -> None:
    calls: list[Path] = []
    entry = cache.entry("images", "dmg", make_create(calls), Cache.check_manifest)
    assert Cache.check_manifest(entry) is None
    damage(entry)
    assert Cache.check_manifest(entry) == reason

    # a new process verifies on first use, and rebuilds
    again = Cache(cache.root).entry("images", "dmg", make_create(calls), Cache.check_manifest)
    assert again == entry
    assert len(calls) == 2
    assert Cache.check_manifest(again) is None
    assert (again / "disk.img").read_bytes().startswith(b"disk contents")


def test_write_manifest_records_digests_and_makes_files_read_only(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c")
    d = tmp_path / "entry"
    d.mkdir()
    (d / "disk.img").write_bytes(b"abc")
    (d / "kernel").write_bytes(b"k")
    (d / "scratch").write_bytes(b"not listed")
    cache.write_manifest(d, {"kind": "image", "name": "x"}, FILES)
    meta = cache.read_manifest(d)
    assert meta["kind"] == "image" and meta["name"] == "x"
    assert meta["files"] == {"disk.img": sha256_file(d / "disk.img"), "kernel": sha256_file(d / "kernel")}
    assert isinstance(meta["created"], float)
    for name in FILES:
        mode = (d / name).stat().st_mode
        assert mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) == 0, f"{name} is still writable"
        assert mode & stat.S_IRUSR
    assert (d / "scratch").stat().st_mode & stat.S_IWUSR  # only the listed files
    assert not (d / ".manifest.json.tmp").exists()
    assert json.loads((d / "manifest.json").read_text())["files"] == meta["files"]


def test_files_of_an_entry_are_read_only(cache: Cache) -> None:
    entry = cache.entry("images", "ro", make_create([]), Cache.check_manifest)
    for name in FILES:
        assert (entry / name).stat().st_mode & 0o222 == 0


def test_remove_tree_removes_read_only_trees(tmp_path: Path) -> None:
    root = tmp_path / "entry"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "f").write_bytes(b"x")
    (root / "sub" / "f").chmod(0o444)
    (root / "sub").chmod(0o555)
    root.chmod(0o555)
    remove_tree(root)
    assert not root.exists()
    remove_tree(root)  # absent: nothing to do


# -- ensure_writable ---------------------------------------------------------------------


def test_ensure_writable_creates_the_layout(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "new" / "cache")
    cache.ensure_writable()
    assert sorted(p.name for p in cache.root.iterdir()) == ["images", "locks", "states", "tmp"]
    assert list((cache.root / "tmp").iterdir()) == []  # the probe is gone


def test_ensure_writable_under_a_regular_file_names_vm_cache(tmp_path: Path) -> None:
    # mkdir under a regular file fails for root too, unlike a chmod-ed directory.
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cache = Cache(blocker / "cache")
    with pytest.raises(ImageError) as info:
        cache.ensure_writable()
    message = str(info.value)
    assert "\n" not in message
    assert "--vm-cache" in message
    assert str(blocker / "cache") in message


# -- concurrent creation from two processes ---------------------------------------------

WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from pytest_vmfixtures.images.cache import Cache

    root, counter, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])

    def create(directory):
        with open(counter, "a") as f:
            f.write("created\\n")
        time.sleep(0.4)  # long enough for the other process to reach the lock
        (directory / "disk.img").write_bytes(b"shared")
        Cache(root).write_manifest(directory, {}, ["disk.img"])

    while not go.exists():
        time.sleep(0.005)
    print(Cache(root).entry("images", "shared", create, Cache.check_manifest))
    """
)


def test_two_processes_create_an_entry_once(tmp_path: Path) -> None:
    root, counter, go = tmp_path / "cache", tmp_path / "count", tmp_path / "go"
    Cache(root).ensure_writable()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(root), str(counter), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    time.sleep(0.05)
    go.touch()
    outputs = [p.communicate(timeout=60) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    assert {out.strip() for out, _ in outputs} == {str(root / "images" / "shared")}
    assert counter.read_text() == "created\n"
    assert (root / "images" / "shared" / "disk.img").read_bytes() == b"shared"


def test_lock_times_out_with_a_message(cache: Cache) -> None:
    told: list[bool] = []
    # flock locks belong to the open file, so a second open in this process contends like another process
    with (
        cache.lock("busy"),
        pytest.raises(ImageError, match="waited 0.3 s for cache lock .*busy.lock"),
        cache.lock("busy", timeout=0.3, waiting=lambda: told.append(True)),
    ):
        pass
    assert told == [True]


def test_clean_tmp_removes_only_unlocked_leftovers(cache: Cache) -> None:
    dead = cache.new_tmp("images--dead-abc")
    (dead / "f").write_bytes(b"x")
    (dead / "f").chmod(0o444)
    busy = cache.new_tmp("images--busy-abc")
    with cache.lock("images-busy-abc"):
        removed = cache.clean_tmp()
    assert not dead.exists()
    assert busy.exists()
    assert removed == [dead.name]


# -- the stamp: digests computed once per cache, not once per process ---------------------------------------

def counting_digests(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the name of every file whose digest is computed from here on."""
    from pytest_vmfixtures.images import cache as cache_module

    hashed: list[str] = []

    def counted(path: Path) -> str:
        hashed.append(path.name)
        return sha256_file(path)

    monkeypatch.setattr(cache_module, "sha256_file", counted)
    return hashed


def test_an_intact_entry_is_not_read_again_by_the_next_process(cache: Cache, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = cache.entry("images", "k1", make_create([]), Cache.check_entry)
    assert (entry / STAMP).is_file()
    hashed = counting_digests(monkeypatch)
    assert Cache(cache.root).entry("images", "k1", make_create([]), Cache.check_entry) == entry
    assert hashed == []  # the stamp vouches for both files: nothing read
    assert Cache.check_manifest(entry) is None and sorted(hashed) == FILES  # the full check still reads them all


def flip_a_byte_keeping_size_and_mtime(path: Path) -> None:
    info = path.stat()
    path.chmod(0o600)
    with open(path, "r+b") as f:
        f.seek(info.st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    path.chmod(info.st_mode)
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))  # what a careful saboteur does; the ctime still moves


def test_a_flipped_bit_is_found_although_size_and_mtime_are_as_stamped(cache: Cache, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    entry = cache.entry("images", "k1", make_create(calls), Cache.check_entry)
    time.sleep(0.01)  # a change time the filesystem can tell from the stamp's
    flip_a_byte_keeping_size_and_mtime(entry / "disk.img")
    hashed = counting_digests(monkeypatch)
    assert Cache.check_entry(entry) == "disk.img does not match its digest"
    assert hashed == ["disk.img"]  # the unchanged kernel is vouched for by the stamp
    assert Cache(cache.root).entry("images", "k1", make_create(calls), Cache.check_entry) == entry
    assert len(calls) == 2  # made again, not used
    assert Cache.check_manifest(entry) is None


def test_a_stamp_that_does_not_match_is_not_trusted(cache: Cache, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = cache.entry("images", "k1", make_create([]), Cache.check_entry)
    stamp = json.loads((entry / STAMP).read_text())
    stamp["disk.img"][0] = "0" * 64  # a digest other than the manifest's
    stamp["kernel"][2] += 1  # another inode
    (entry / STAMP).write_text(json.dumps(stamp))
    hashed = counting_digests(monkeypatch)
    assert Cache.check_entry(entry) is None
    assert sorted(hashed) == FILES
    assert json.loads((entry / STAMP).read_text()) != stamp  # recorded right again
    (entry / STAMP).write_text("not json")
    hashed.clear()
    assert Cache.check_entry(entry) is None and sorted(hashed) == FILES


def test_a_stamp_that_cannot_be_written_only_costs_the_digests(cache: Cache, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = cache.entry("images", "k1", make_create([]), Cache.check_entry)
    (entry / STAMP).unlink()
    (entry / STAMP).mkdir()  # nothing can replace it, root or not
    hashed = counting_digests(monkeypatch)
    assert Cache.check_entry(entry) is None and sorted(hashed) == FILES
    hashed.clear()
    assert Cache.check_entry(entry) is None and sorted(hashed) == FILES  # checked in full each time, still right
    assert [p.name for p in entry.iterdir() if p.name.endswith(".tmp")] == []  # no temporary stamp left behind
