"""The plugin inside a real pytest run (pytester), up to collection: no guest is ever booted.

Every run gets fake host tools first on PATH (a qemu that refuses to run), a
private cache dir and a recipes dir with two tiny images, ``a`` and ``b``, so
the results do not depend on what this host has installed or cached.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from pytest_vmfixtures.images.catalog import BUILTIN_IMAGES_DIR

FAKE_TOOLS = ("qemu-system-x86_64", "qemu-img", "setpriv", "mmdebstrap")
USAGE_ERROR = 4
SKIP_HINT = " (or pass --vm-unavailable=skip to skip the tests that need a guest)"

OPTIONS = {
    "--vm-image": "vm_images",
    "--vm-images-dir": "vm_images_dir",
    "--vm-accel": "vm_accel",
    "--vm-cache": "vm_cache",
    "--vm-boot-timeout": "vm_boot_timeout",
    "--vm-command-timeout": "vm_command_timeout",
    "--vm-backend": "vm_backend",
    "--vm-standby": "vm_standby",
    "--vm-qemu-binary": "vm_qemu_binary",
    "--vm-provision-key": "vm_provision_key",
}


class Env:
    def __init__(self, pytester: pytest.Pytester, root: Path) -> None:
        self.pytester = pytester
        self.cache = root / "cache"
        self.recipes = root / "recipes"
        self.bin = root / "bin"

    def args(self, *args: str) -> list[str]:
        return ["-p", "no:cacheprovider", "--vm-cache", str(self.cache), "--vm-images-dir", str(self.recipes), *args]

    def run(self, *args: str) -> pytest.RunResult:
        return self.pytester.runpytest(*self.args(*args))

    def collect(self, *args: str) -> pytest.RunResult:
        return self.run("--collect-only", "-q", *args)


@pytest.fixture
def env(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Env:
    e = Env(pytester, pytester.path)  # inside the run's dir, so the run's rootdir stays there
    e.bin.mkdir()
    for tool in FAKE_TOOLS:
        path = e.bin / tool
        path.write_text(f"#!/bin/sh\necho 'fake {tool}: a plugin test must not run it' >&2\nexit 1\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{e.bin}:/usr/bin:/bin")
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)
    e.recipes.mkdir()
    recipe = (BUILTIN_IMAGES_DIR / "debian-12.toml").read_text()
    for name in ("a", "b"):
        (e.recipes / f"{name}.toml").write_text(recipe)
    return e


MATRIX_TESTS = """
import pytest

def test_x(vm):
    pass

@pytest.mark.vm("a")
def test_pinned(vm):
    pass

@pytest.mark.vm(image="b", memory_mb=1024)
def test_pinned_kw(vm):
    pass

def test_factory(vm_factory):
    pass

def test_plain():
    pass

@pytest.mark.parametrize("n", [1, 2])
def test_plain_param(n):
    pass
"""


def collected(result: pytest.RunResult) -> list[str]:
    return [line for line in result.outlines if "::" in line]


# -- the marker ---------------------------------------------------------------------------


def test_vm_marker_is_registered_for_strict_markers(env: Env) -> None:
    env.pytester.makepyfile(
        """
        import pytest

        @pytest.mark.vm("a", memory_mb=256)
        def test_marked_but_no_guest():
            pass
        """
    )
    result = env.run("--strict-markers")
    result.assert_outcomes(passed=1)
    assert result.ret == 0


def test_markers_lists_vm(env: Env) -> None:
    result = env.run("--markers")
    assert result.ret == 0
    result.stdout.fnmatch_lines(
        ["@pytest.mark.vm(image=None, images=None, memory_mb=512, cpus=1, network='restricted'*):*"]
    )


# -- options ----------------------------------------------------------------------------


def test_help_shows_every_option_with_its_ini_name(env: Env) -> None:
    result = env.pytester.runpytest("--help")
    assert result.ret == 0
    text = " ".join(result.stdout.str().split())  # help text wraps; compare with whitespace collapsed
    shown = set(re.findall(r"(--vm-[a-z-]+)=", text))
    assert shown >= set(OPTIONS)
    for option in shown:
        # the option's own help (up to the next --vm- option) ends by naming its ini key and default
        entry = re.search(rf"{option}=\S+ ((?:(?!--vm-).)*?)\(ini: (vm_[a-z_]+); default: [^)]+\)", text)
        assert entry, f"{option} does not name its ini key"
        assert entry.group(2) == OPTIONS.get(option, entry.group(2))
    for ini in OPTIONS.values():
        assert re.search(rf"\b{ini} \(\w+\):", text), f"ini-options section lacks {ini}"


def test_bad_accel_is_a_usage_error(env: Env) -> None:
    result = env.run("--vm-accel", "bogus")
    assert result.ret == USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --vm-accel 'bogus' is not one of auto, kvm, tcg"])


def test_bad_accel_in_ini_is_a_usage_error(env: Env) -> None:
    env.pytester.makeini("[pytest]\nvm_accel = hvf\n")
    result = env.run()
    assert result.ret == USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --vm-accel 'hvf' is not one of auto, kvm, tcg"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--vm-boot-timeout", "soon"), "ERROR: --vm-boot-timeout must be a number of seconds, got 'soon'"),
        (("--vm-boot-timeout", "0"), "ERROR: --vm-boot-timeout must be positive, got '0'"),
        (("--vm-command-timeout", "none"), "ERROR: --vm-command-timeout must be a number of seconds, got 'none'"),
        (("--vm-command-timeout", "0"), "ERROR: --vm-command-timeout must be positive, got '0'"),
        (("--vm-standby", "-1"), "ERROR: --vm-standby must be 0 or more, got '-1'"),
        (("--vm-backend", "hyperv"), "ERROR: --vm-backend 'hyperv' is not one of qemu, libvirt"),
    ],
)
def test_bad_option_values_are_usage_errors(env: Env, args: tuple[str, ...], message: str) -> None:
    result = env.run(*args)
    assert result.ret == USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_bad_command_timeout_in_ini_is_a_usage_error(env: Env) -> None:
    env.pytester.makeini("[pytest]\nvm_command_timeout = forever\n")
    result = env.run()
    assert result.ret == USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --vm-command-timeout must be a number of seconds, got 'forever'"])
    assert len([line for line in result.errlines if line.strip()]) == 1


SHOW_COMMAND_TIMEOUT = """
from pytest_vmfixtures.fixtures import SESSION_KEY

def test_show(request):
    print("command timeout", request.config.stash[SESSION_KEY].settings.command_timeout)
"""


@pytest.mark.parametrize(
    ("ini", "args", "expected"),
    [(None, (), "900.0"), ("2.5", (), "2.5"), ("2.5", ("--vm-command-timeout=60",), "60.0")],
    ids=["default", "ini", "option-wins"],
)
def test_command_timeout_reaches_the_settings(env: Env, ini: str | None, args: tuple[str, ...], expected: str) -> None:
    if ini is not None:
        env.pytester.makeini(f"[pytest]\nvm_command_timeout = {ini}\n")
    env.pytester.makepyfile(SHOW_COMMAND_TIMEOUT)
    result = env.run("-s", *args)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"*command timeout {expected}*"])


def test_report_header_names_the_accel(env: Env) -> None:
    env.pytester.makepyfile("def test_plain():\n    pass\n")
    result = env.run("--vm-accel", "tcg")
    result.assert_outcomes(passed=1)
    header, check = [line for line in result.outlines if line.startswith("vmfixtures:")]
    assert check.startswith("vmfixtures: host check:")
    assert header.startswith("vmfixtures: accel tcg (requested)")
    assert f"cache {env.cache}" in header


def test_report_header_under_auto_says_which_accel_and_why(env: Env) -> None:
    env.pytester.makepyfile("def test_plain():\n    pass\n")
    result = env.run()
    header = [line for line in result.outlines if line.startswith("vmfixtures:")][0]
    assert re.match(r"vmfixtures: accel (kvm|tcg) \(.+\)", header), header


# -- the image matrix -----------------------------------------------------------------------


def test_ids_follow_the_image_matrix(env: Env) -> None:
    env.pytester.makepyfile(test_m=MATRIX_TESTS)
    result = env.collect("--vm-image", "a", "--vm-image", "b")
    assert result.ret == 0, result.stderr.str()
    assert collected(result) == [
        "test_m.py::test_x[a]",
        "test_m.py::test_x[b]",
        "test_m.py::test_pinned",
        "test_m.py::test_pinned_kw",
        "test_m.py::test_factory[a]",
        "test_m.py::test_factory[b]",
        "test_m.py::test_plain",
        "test_m.py::test_plain_param[1]",
        "test_m.py::test_plain_param[2]",
    ]


def test_comma_separated_and_repeated_images(env: Env) -> None:
    env.pytester.makepyfile(test_m="def test_x(vm):\n    pass\n")
    result = env.collect("--vm-image", "b,a", "--vm-image", "a")
    assert collected(result) == ["test_m.py::test_x[b]", "test_m.py::test_x[a]"]


def test_matrix_from_ini_and_cli_wins(env: Env) -> None:
    env.pytester.makeini("[pytest]\nvm_images = b a\n")
    env.pytester.makepyfile(test_m="def test_x(vm):\n    pass\n")
    assert collected(env.collect()) == ["test_m.py::test_x[b]", "test_m.py::test_x[a]"]
    assert collected(env.collect("--vm-image", "a")) == ["test_m.py::test_x[a]"]


def test_default_matrix_is_debian_12(env: Env) -> None:
    env.pytester.makepyfile(test_m="def test_x(vm):\n    pass\n")
    result = env.collect()
    assert result.ret == 0, result.stderr.str()
    assert collected(result) == ["test_m.py::test_x[debian-12]"]


def test_images_restriction_skips_other_images_with_the_reason(env: Env) -> None:
    env.pytester.makepyfile(
        test_r="""
        import pytest

        @pytest.mark.vm(images=["a"])
        def test_only_a(vm):
            pass
        """
    )
    assert collected(env.collect("--vm-image", "a,b")) == ["test_r.py::test_only_a[a]", "test_r.py::test_only_a[b]"]
    # run only the cell that is skipped: a skipped test never asks for a guest
    result = env.run("test_r.py::test_only_a[b]", "-rs", "--vm-image", "a,b")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED [[]1[]] *runs only on images a, not b"])


def test_class_and_module_markers_apply(env: Env) -> None:
    env.pytester.makepyfile(
        test_c="""
        import pytest

        pytestmark = pytest.mark.vm("a")

        class TestPinnedByModule:
            def test_one(self, vm):
                pass

        @pytest.mark.vm(images=["b"])
        class TestRestricted:
            @pytest.mark.vm(image=None)
            def test_two(self, vm):
                pass
        """
    )
    result = env.collect("--vm-image", "a", "--vm-image", "b")
    assert result.ret == 0, result.stderr.str()
    assert collected(result) == [
        "test_c.py::TestPinnedByModule::test_one",  # pinned by the module's marker
        "test_c.py::TestRestricted::test_two[a]",  # image=None on the test unpins it again
        "test_c.py::TestRestricted::test_two[b]",
    ]


# -- errors a user can make ----------------------------------------------------------------


BAD_MARKER = """
import pytest

@pytest.mark.vm(colour="red")
def test_x(vm):
    pass
"""


def test_unknown_marker_argument_is_an_error_naming_the_key(env: Env) -> None:
    env.pytester.makepyfile(test_bad=BAD_MARKER)
    result = env.collect()
    assert result.ret != 0
    output = result.stdout.str() + result.stderr.str()
    assert "test_bad.py::test_x: @pytest.mark.vm got unknown argument 'colour'" in output
    assert "allowed: image, images, memory_mb, cpus, network" in output


def test_bad_marker_is_reported_as_one_line_not_a_traceback(env: Env) -> None:
    # A typo in a marker is the user's mistake, not the plugin's: the message alone, no pytest/pluggy frames.
    env.pytester.makepyfile(test_bad=BAD_MARKER)
    result = env.collect()
    output = result.stdout.str() + result.stderr.str()
    assert "unknown argument 'colour'" in output
    errors = output.split("warnings summary")[0]  # in-process runs warn that the plugin was imported early
    frames = re.findall(r"\S*(?:_pytest|pluggy)/\S+\.py:\d+", errors)
    assert frames == [], "the marker error is shown with a traceback through pytest's internals"


def test_bad_marker_value_is_an_error(env: Env) -> None:
    env.pytester.makepyfile(
        test_bad="""
        import pytest

        @pytest.mark.vm(memory_mb="lots")
        def test_x(vm):
            pass
        """
    )
    result = env.collect()
    assert result.ret != 0
    assert "memory_mb must be an integer, got 'lots'" in result.stdout.str() + result.stderr.str()


def test_unknown_image_lists_the_available_ones(env: Env) -> None:
    env.pytester.makepyfile(test_m="def test_x(vm):\n    pass\n")
    result = env.collect("--vm-image", "nosuch")
    assert result.ret == USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: unknown image 'nosuch'; available: a, b, debian-12*--vm-images-dir*"])


@pytest.mark.parametrize("marker", ['"nosuch"', 'images=["a", "nosuch"]'])
def test_unknown_image_in_a_marker(env: Env, marker: str) -> None:
    env.pytester.makepyfile(test_m=f"import pytest\n\n@pytest.mark.vm({marker})\ndef test_x(vm):\n    pass\n")
    result = env.collect("--vm-image", "a")
    assert result.ret == USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: unknown image 'nosuch'; available: a, b, debian-12*"])


def test_missing_qemu_binary_is_a_one_line_usage_error(env: Env) -> None:
    env.pytester.makepyfile(test_m="def test_x(vm):\n    pass\n")
    result = env.collect("--vm-qemu-binary", "/nonexistent/qemu")
    assert result.ret == USAGE_ERROR
    errors = [line for line in result.errlines if line.strip()]
    assert errors == [
        "ERROR: /nonexistent/qemu not found: install QEMU (Debian: apt install qemu-system-x86 qemu-utils)" + SKIP_HINT
    ]


def test_a_missing_emulator_for_an_images_architecture_names_its_package(env: Env) -> None:
    env.pytester.makepyfile(test_m="def test_x(vm):\n    pass\n")
    result = env.collect("--vm-image", "debian-12-arm64", "--vm-qemu-binary", "arm64=/nonexistent/qemu-aarch64")
    assert result.ret == USAGE_ERROR
    errors = [line for line in result.errlines if line.strip()]
    assert errors == ["ERROR: image 'debian-12-arm64' is arm64: /nonexistent/qemu-aarch64 not found: "
                      "install it (Debian: apt install qemu-system-arm)" + SKIP_HINT]


def test_a_foreign_architecture_on_the_libvirt_backend_is_a_usage_error(env: Env) -> None:
    env.pytester.makepyfile(test_m="import pytest\n\n@pytest.mark.vm(image='debian-13-riscv64')\ndef test_x(vm):\n    pass\n")
    result = env.collect("--vm-backend", "libvirt")
    assert result.ret == USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: image 'debian-13-riscv64' is riscv64; the libvirt backend runs x86 guests only*"])


def test_an_architecture_matrix_puts_each_image_in_the_test_id(env: Env) -> None:
    env.pytester.makepyfile(test_m="def test_x(vm):\n    pass\n")
    result = env.collect("--vm-image", "debian-12", "--vm-image", "debian-12-arm64")
    assert result.ret == 0
    assert [line for line in result.outlines if "::" in line] == [
        "test_m.py::test_x[debian-12]", "test_m.py::test_x[debian-12-arm64]"]


def test_unwritable_cache_is_a_usage_error_naming_vm_cache(env: Env, tmp_path: Path) -> None:
    blocker = tmp_path / "regular-file"
    blocker.write_text("")
    env.cache = blocker / "cache"  # mkdir under a regular file fails, even for root
    env.pytester.makepyfile(test_m="def test_x(vm):\n    pass\n")
    result = env.collect()
    assert result.ret == USAGE_ERROR
    errors = [line for line in result.errlines if line.strip()]
    assert len(errors) == 1
    assert errors[0].startswith(f"ERROR: cache dir {env.cache} is not writable")
    assert "--vm-cache" in errors[0]


# -- a host that cannot run the run's guests: --vm-unavailable ----------------------------------------

GUESTS_AND_NOT = """
import pytest

def test_one(vm):
    pass

@pytest.mark.vm(memory_mb=1024)
def test_two(vm):
    pass

def test_three(vm_factory):
    pass

def test_plain():
    pass
"""


def test_the_header_checks_only_what_the_runs_images_need(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without arch-test a debian-12 run's host check has no problem; a debian-12-i386 run's has one."""
    import shutil

    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda tool, mode=os.F_OK | os.X_OK, path=None:
                        None if tool == "arch-test" else real_which(tool, mode, path))
    env.pytester.makepyfile("def test_plain():\n    pass\n")
    plain = env.run()
    assert "problem" not in plain.stdout.str()
    plain.stdout.fnmatch_lines(["vmfixtures: *images debian-12", "vmfixtures: host check: *"])
    i386 = env.run("--vm-image=debian-12-i386")
    i386.stdout.fnmatch_lines(["vmfixtures: host check: 1 problem(s) (image build); run pytest-vmfixtures doctor"])


def test_no_qemu_stops_the_run_once_naming_the_fix_and_the_skip_option(env: Env) -> None:
    env.pytester.makepyfile(test_m=GUESTS_AND_NOT)
    result = env.run("--vm-qemu-binary=/nonexistent/qemu")
    assert result.ret == USAGE_ERROR
    errors = [line for line in result.errlines if line.strip()]
    assert len(errors) == 1 and "/nonexistent/qemu not found" in errors[0] and "--vm-unavailable=skip" in errors[0]
    assert not (env.cache / "run").exists()


@pytest.mark.parametrize("how", ["option", "ini"])
def test_no_qemu_with_skip_skips_guest_tests_with_the_reason_and_runs_the_rest(env: Env, how: str) -> None:
    env.pytester.makepyfile(test_m=GUESTS_AND_NOT)
    if how == "ini":
        env.pytester.makeini("[pytest]\nvm_unavailable = skip\n")
    result = env.run("--vm-qemu-binary=/nonexistent/qemu", "-rs", *(["--vm-unavailable=skip"] if how == "option" else []))
    result.assert_outcomes(passed=1, skipped=3)
    result.stdout.fnmatch_lines(["SKIPPED*no guest here (--vm-unavailable=skip): /nonexistent/qemu not found*"])
    assert "fake" not in result.stderr.str()


def test_skip_mode_skips_only_the_images_this_host_cannot_run(env: Env) -> None:
    """An arm64 cell without its emulator is skipped; the x86 cell is left to run (shown by its markers)."""
    env.pytester.makepyfile(test_m="def test_x(vm):\n    pass\n")
    env.pytester.makeconftest(
        "import pytest\n\n@pytest.hookimpl(trylast=True)\ndef pytest_collection_modifyitems(items):\n"
        "    for item in items:\n        reasons = [m.kwargs.get('reason', '') for m in item.iter_markers('skip')]\n"
        "        print('SKIPS', item.name.replace('[', '(').replace(']', ')'), len(reasons), *reasons)\n")
    result = env.collect("-s", "--vm-unavailable=skip", "--vm-image=a,debian-12-arm64",
                         "--vm-qemu-binary=arm64=/nonexistent/qemu-aarch64")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["SKIPS test_x(a) 0", "SKIPS test_x(debian-12-arm64) 1 no guest here*qemu-aarch64 not found*"])


def test_a_bad_vm_unavailable_value_is_a_usage_error(env: Env) -> None:
    env.pytester.makepyfile(test_m="def test_plain():\n    pass\n")
    result = env.run("--vm-unavailable=maybe")
    assert result.ret == USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --vm-unavailable 'maybe' is not one of error, skip"])


def test_a_missing_build_tool_of_an_image_not_built_stops_the_run_naming_the_package(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    (env.bin / "mmdebstrap").unlink()
    monkeypatch.setenv("PATH", str(env.bin))  # the fake QEMU tools only: no mmdebstrap anywhere on PATH
    env.pytester.makepyfile(test_m="def test_x(vm):\n    pass\n")
    result = env.collect("--vm-image=a")
    assert result.ret == USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: image 'a' is not built yet and building it needs mmdebstrap: install the mmdebstrap package*"])


# -- runs without guests ask for nothing -----------------------------------------------------


def test_a_run_without_guest_tests_needs_no_qemu_and_creates_nothing(env: Env) -> None:
    env.pytester.makepyfile(test_m="def test_plain():\n    pass\n")
    result = env.run("--vm-qemu-binary", "/nonexistent/qemu", "--vm-image", "nosuch")
    result.assert_outcomes(passed=1)
    assert not env.cache.exists()


def test_collect_only_with_guest_tests_boots_nothing(env: Env) -> None:
    env.pytester.makepyfile(test_m=MATRIX_TESTS)
    result = env.collect("--vm-image", "a,b")
    assert result.ret == 0
    assert not (env.cache / "run").exists()
    assert list((env.cache / "images").iterdir()) == []
    assert "fake" not in result.stderr.str()
