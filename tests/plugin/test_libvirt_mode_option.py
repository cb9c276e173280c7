"""--vm-libvirt-mode and its ini twin: a bad value stops the run with one line naming the choices."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("where", ["option", "ini"])
def test_a_bad_libvirt_mode_is_a_one_line_usage_error(pytester: pytest.Pytester, where: str) -> None:
    pytester.makepyfile("def test_nothing():\n    pass\n")
    if where == "ini":
        pytester.makeini("[pytest]\nvm_libvirt_mode = snapshots\n")
        result = pytester.runpytest()
    else:
        result = pytester.runpytest("--vm-libvirt-mode", "snapshots")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.stderr.lines if line.strip()]
    assert errors == ["ERROR: --vm-libvirt-mode 'snapshots' is not one of saved-state, snapshot"]


def test_saved_state_on_another_driver_is_refused(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest("--vm-backend", "libvirt", "--vm-libvirt-uri", "vbox:///session",
                                "--vm-libvirt-mode", "saved-state")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --vm-libvirt-mode saved-state needs libvirt's QEMU driver, but vbox:///session*"])
