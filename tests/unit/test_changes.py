"""vm.changes()' parts that need no guest: patterns, the Changes value, parsing, and the guest-side scripts
run on the host against a directory (with dash and with busybox's find, stat and awk)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pytest_vmfixtures import changes
from pytest_vmfixtures.changes import (
    DEFAULT_IGNORE,
    END,
    WALKED,
    Changes,
    PackageChanges,
    baseline_script,
    check_patterns,
    default_patterns,
    diff_script,
    ignored,
    parse,
)
from pytest_vmfixtures.command import CommandResult
from pytest_vmfixtures.errors import GuestError
from pytest_vmfixtures.options import OptionError, parse_changes_ignore


def test_patterns_must_be_absolute_strings() -> None:
    assert check_patterns("/opt/*", "w") == ("/opt/*",)
    assert check_patterns(["/a", "/b/*"], "w") == ("/a", "/b/*")
    with pytest.raises(ValueError, match=r"^w: pattern 'opt/\*' is not an absolute glob"):
        check_patterns(["/a", "opt/*"], "w")
    with pytest.raises(ValueError, match=r"^w: pattern b'/x' is not a string"):
        check_patterns([b"/x"], "w")
    with pytest.raises(ValueError, match="got 3"):
        check_patterns(3, "w")
    with pytest.raises(OptionError, match="^vm_changes_ignore: pattern 'var/log' is not an absolute glob"):
        parse_changes_ignore(["/ok", "var/log"])
    assert parse_changes_ignore(["", " /srv/* "]) == ("/srv/*",)


def test_a_pattern_covers_what_is_below_it() -> None:
    assert ignored("/var/log/apt/history.log", ["/var/log"])
    assert ignored("/etc/vmfx-x", ["/etc/vmfx-*"])
    assert not ignored("/var/logs", ["/var/log"])
    assert not ignored("/etc", ["/etc/*"])
    assert all(pattern.startswith("/") and why for pattern, why in DEFAULT_IGNORE)
    assert "/var/lib/dpkg" in default_patterns()


def test_changes_value() -> None:
    none = Changes()
    assert not none and str(none) == "no changes"
    changes = Changes(added=["/b"], modified=["/a"], removed=["/c"], packages=PackageChanges(added=["x"], modified=["y"]))
    assert changes
    assert str(changes).splitlines() == ["C /a", "A /b", "D /c", "package added: x", "package version changed: y"]
    assert Changes(packages=PackageChanges(removed=["z"]))
    assert Changes(added=["/x"]) == Changes(added=["/x"])


def _result(stdout: str, code: int = 0, stderr: str = "") -> CommandResult:
    return CommandResult("changes", code, stdout, stderr)


def test_parse() -> None:
    out = f"A\t/etc/new\nC\t/var/log/syslog\nD\t/etc/old\nPA\tfoo\nPD\tbar\nPC\tbaz\n{END}\n"
    changes = parse("g", _result(out), default_patterns())
    assert changes == Changes(["/etc/new"], [], ["/etc/old"], PackageChanges(["foo"], ["bar"], ["baz"]))
    with pytest.raises(GuestError, match="^g: vm.changes\\(\\) has no baseline"):
        parse("g", _result("VMFX-NOBASELINE\n"), ())
    with pytest.raises(GuestError, match=r"^g: vm.changes\(\) cannot tell what changed: the guest has no awk"):
        parse("g", _result("VMFX-ERROR the guest has no awk (and no busybox) any more\n"), ())
    with pytest.raises(GuestError, match=r"shell tools failed \(sh: 1: find: not found\)$"):
        parse("g", _result("", 127, "sh: 1: find: not found\n"), ())


SHELLS = {
    "dash": ["dash", "-c"],
    # busybox's sh, and its find (which has no -printf) and stat: the tiny image's tools
    "busybox": ["busybox", "sh", "-c", 'find() { busybox find "$@"; }; awk() { busybox awk "$@"; }; eval "$0"'],
}


def _run(shell: str, script: str) -> str:
    if shutil.which(SHELLS[shell][0]) is None:
        pytest.skip(f"{SHELLS[shell][0]} is not installed")
    proc = subprocess.run([*SHELLS[shell], script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _stop_watcher(ram: Path) -> bool:
    """Stop the baseline's watcher if one runs; whether one ran."""
    ready = ram / "vmfx-changes" / "watch" / "ready"
    if not ready.exists():
        return False
    try:
        os.kill(int(ready.read_text()), signal.SIGTERM)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def ram(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Where a test keeps its baseline; the watcher it starts is stopped at the end."""
    path = tmp_path / "ram"
    path.mkdir()
    yield path
    _stop_watcher(path)


# dash: with perl on the host, the baseline starts its watcher ("watched"), and the comparison looks only at
# the paths it noted; stopped ("walked"), or having lost events, the comparison lists everything again.
# busybox: its find has no -printf, so no watcher, as on the tiny image.
@pytest.mark.parametrize(("shell", "mode"), [("dash", "watched"), ("dash", "walked"), ("dash", "overflowed"),
                                             ("busybox", "walked")])
def test_scripts_on_a_directory(tmp_path: Path, ram: Path, shell: str, mode: str) -> None:
    root = tmp_path / "root"
    (root / "etc" / "sub").mkdir(parents=True)
    for name in ("gone", "edited", "touched", "mode", "same-size"):
        (root / "etc" / name).write_text(name)
    (root / "etc" / "link").symlink_to("gone")
    (root / "var" / "log").mkdir(parents=True)
    (root / "var" / "log" / "syslog").write_text("log")
    (root / "srv" / "tree" / "deep").mkdir(parents=True)
    (root / "srv" / "tree" / "deep" / "file").write_text("file")
    (root / "srv" / "moved" / "in").mkdir(parents=True)
    (root / "srv" / "moved" / "in" / "kept").write_text("kept")
    skip = [f"{root}/var/log"]  # as the defaults' /var/log: below it nothing is hashed or compared
    said = _run(shell, baseline_script([str(ram)], [str(root)], skip))
    # root, etc, sub, five files, a link, var (not var/log: skipped), srv and its seven
    assert "17 paths" in said
    assert (", watching 9 directories" in said) == (shell == "dash"), said
    if mode == "walked":
        assert _stop_watcher(ram) == (shell == "dash")
    else:  # the package database looks moved: the packages are read again, and this host's are as they were
        (ram / "vmfx-changes" / "pkgdb").write_text("/var/lib/dpkg/status 1 2 3.0 4.0\n")
    if mode == "overflowed":
        with (ram / "vmfx-changes" / "watch" / "log").open("a") as log:
            log.write("O\tthe kernel's event queue overflowed\n")
    assert f"{root}/var/log/syslog" not in (ram / "vmfx-changes" / "hashes").read_text()
    assert f"{root}/etc/touched" in (ram / "vmfx-changes" / "hashes").read_text()
    time.sleep(1.1)  # times move by at least a second
    (root / "etc" / "gone").unlink()
    (root / "etc" / "edited").write_text("edited, longer")
    (root / "etc" / "same-size").write_text("SAME-SIZE")
    os.utime(root / "etc" / "touched")
    (root / "etc" / "touched").write_text("touched")  # the same content again: no change
    (root / "etc" / "mode").chmod(0o600)
    (root / "etc" / "link").unlink()
    (root / "etc" / "link").symlink_to("edited")
    (root / "opt" / "x").mkdir(parents=True)
    (root / "etc" / "brief").write_text("made and removed")
    (root / "etc" / "brief").unlink()
    (root / "var" / "log" / "syslog").write_text("more log")
    (root / "var" / "log" / "new.log").write_text("new")
    shutil.rmtree(root / "srv" / "tree")
    (root / "srv" / "moved").rename(root / "etc" / "sub" / "moved")  # a watched tree moved, then changed
    (root / "etc" / "sub" / "moved" / "in" / "kept").write_text("KEPT")
    (root / "etc" / "sub" / "moved" / "in" / "new").write_text("new")
    out = _run(shell, diff_script([str(ram)], skip))
    # watched: the answer came from the watcher's notes, which it brought up to date first
    assert (WALKED in out) == (mode != "watched")
    if mode == "watched":
        assert "\nF\t" in (ram / "vmfx-changes" / "watch" / "log").read_text()
    changes = parse("g", _result(out), ())
    r = str(root)
    moved = [f"{r}/etc/sub/moved{p}" for p in ("", "/in", "/in/kept", "/in/new")]
    assert changes.added == [f"{r}/etc/sub/moved", *moved[1:], f"{r}/opt", f"{r}/opt/x"]
    assert changes.modified == [f"{r}/etc/edited", f"{r}/etc/link", f"{r}/etc/mode", f"{r}/etc/same-size"]
    gone = [f"{r}/srv/{p}" for p in ("moved", "moved/in", "moved/in/kept", "tree", "tree/deep", "tree/deep/file")]
    assert changes.removed == [f"{r}/etc/gone", *gone]
    assert not changes.packages
    assert parse("g", _result(_run(shell, diff_script([str(ram)], skip))), ()) == changes
    assert not list(ram.glob("*/tmp.*")), "the comparison leaves nothing behind"


def test_no_baseline_is_said(tmp_path: Path) -> None:
    out = _run("dash", diff_script([str(tmp_path)]))
    assert out.strip() == "VMFX-NOBASELINE"


def test_what_the_plugin_writes_is_left_out_when_compared_not_by_the_guest_script() -> None:
    # The guest script is in every saved state's key: a path added for the comparison must not change it.
    from pytest_vmfixtures.changes import PLUGIN_WRITES, baseline_script

    assert "/etc/adjtime" in default_patterns()
    assert all(pattern not in baseline_script() for pattern, _why in PLUGIN_WRITES)


def test_many_noted_paths_are_compared_line_by_line(tmp_path: Path, ram: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for i in range(300):
        (root / "etc" / f"kept{i}").write_text("kept")
    said = _run("dash", baseline_script([str(ram)], [str(root)], []))
    assert ", watching 2 directories" in said, said
    for i in range(300):  # more than the watched comparison looks up one by one
        (root / "etc" / f"new{i}").write_text("new")
    (root / "etc" / "kept7").unlink()
    (root / "etc" / "kept8").chmod(0o600)
    out = _run("dash", diff_script([str(ram)], []))
    assert WALKED not in out
    changes = parse("g", _result(out), ())
    assert changes.added == sorted(f"{root}/etc/new{i}" for i in range(300))
    assert (changes.modified, changes.removed) == ([f"{root}/etc/kept8"], [f"{root}/etc/kept7"])


def test_the_comparison_program_is_strict_and_quiet() -> None:
    # It is shipped without strict and warnings (their loading is slow under emulation): checked here.
    if shutil.which("perl") is None:
        pytest.skip("perl is not installed")
    source = Path(changes.__file__).with_name("changes_diff.pl")
    proc = subprocess.run(["perl", "-Mstrict", "-Mwarnings", "-c", str(source)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr.strip() == f"{source} syntax OK", proc.stderr


def test_content_compared_by_hash_at_every_size(tmp_path: Path, ram: Path) -> None:
    # Times moved, size equal: compared by MD5, in perl for small files and by md5sum for larger ones.
    root = tmp_path / "root"
    root.mkdir()
    sizes = (0, 1, 55, 56, 64, 100, 5000, 8192, 9000)
    for size in sizes:
        (root / f"f{size}").write_bytes(bytes((7 * i + 3) % 256 for i in range(size)))
    assert ", watching 1 directories" in _run("dash", baseline_script([str(ram)], [str(root)], []))
    time.sleep(1.1)
    for size in sizes:  # the same bytes again
        (root / f"f{size}").write_bytes((root / f"f{size}").read_bytes())
    for size in (56, 9000):  # one byte changed in place
        with (root / f"f{size}").open("r+b") as f:
            f.seek(size // 2)
            f.write(b"X")
    out = _run("dash", diff_script([str(ram)], []))
    assert WALKED not in out
    assert parse("g", _result(out), ()).modified == [f"{root}/f56", f"{root}/f9000"]


def test_a_directory_removed_and_made_again_is_looked_into(tmp_path: Path, ram: Path) -> None:
    root = tmp_path / "root"
    (root / "etc" / "app").mkdir(parents=True)
    (root / "etc" / "app" / "old").write_text("old")
    assert ", watching 3 directories" in _run("dash", baseline_script([str(ram)], [str(root)], []))
    shutil.rmtree(root / "etc" / "app")  # noted as removed first, then as made
    (root / "etc" / "app").mkdir()
    (root / "etc" / "app" / "new").write_text("new")
    out = _run("dash", diff_script([str(ram)], []))
    assert WALKED not in out
    changes = parse("g", _result(out), ())
    assert (changes.added, changes.removed) == ([f"{root}/etc/app/new"], [f"{root}/etc/app/old"])
