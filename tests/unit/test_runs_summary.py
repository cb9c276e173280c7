"""scripts/runs.py, the verdicts of scripts/test, on JUnit files made here (no test run, no guest)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_runs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vmfx_scripts_runs", ROOT / "scripts" / "runs.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


runs = load_runs()


def junit(path: Path, passed: int = 0, failed: int = 0, skipped: int = 0, errors: int = 0) -> None:
    kinds = [("ok", "", passed), ("bad", '<failure message="x"/>', failed),
             ("skip", '<skipped message="no rig"/>', skipped), ("err", '<error message="e"/>', errors)]
    cases = "".join(f'<testcase classname="t" name="{kind}{i}">{child}</testcase>'
                    for kind, child, count in kinds for i in range(count))
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{cases}</testsuite></testsuites>')


def summarize(tmp_path: Path, rows: list[str], ci: bool = True) -> tuple[int, str, list[object]]:
    (tmp_path / "runs.tsv").write_text("".join(row + "\n" for row in rows))
    loaded = runs.load(tmp_path)
    for run in loaded:
        runs.judge(run, tmp_path, ci)
    return (1 if any(r.verdict == "FAIL" for r in loaded) else 0), runs.table(loaded), loaded


def test_a_clean_run_passes_and_is_a_row_of_the_table(tmp_path: Path) -> None:
    junit(tmp_path / "main.xml", passed=10, skipped=2)
    status, table, (run,) = summarize(tmp_path, ["main\t0\t2\t12\t37\t"])
    assert status == 0
    assert (run.passed, run.failed, run.skipped, run.errors, run.verdict) == (10, 0, 2, 0, "ok")
    assert table.splitlines()[0].split() == ["run", "passed", "failed", "skipped", "errors", "seconds", "verdict"]
    assert table.splitlines()[2].split() == ["main", "10", "0", "2", "0", "37", "ok"]


@pytest.mark.parametrize(("counts", "row", "why"), [
    ({"skipped": 5}, "r\t0\t0\t5\t1\t", "no test passed (all 5 skipped)"),
    ({"passed": 3, "skipped": 2}, "r\t0\t1\t5\t1\t", "2 skipped, 1 allowed"),
    ({"passed": 3}, "r\t0\t0\t5\t1\t", "ran 3 of the 5 tests it collects"),
    ({"passed": 3, "failed": 1}, "r\t1\t0\t4\t1\t", "pytest exited 1"),
    ({}, "r\t5\t0\t0\t1\t", "pytest collected no tests (exit 5)"),
    ({"passed": 3}, "r\t0\t0\t\t1\t", "could not count the tests it collects"),
])
def test_runs_that_must_fail(tmp_path: Path, counts: dict[str, int], row: str, why: str) -> None:
    junit(tmp_path / "r.xml", **counts)
    status, table, (run,) = summarize(tmp_path, [row])
    assert status == 1
    assert run.verdict == "FAIL"
    assert why in run.why
    assert f"r: FAIL: {run.why}" in table


def test_a_missing_or_broken_junit_file_fails(tmp_path: Path) -> None:
    (tmp_path / "b.xml").write_text("<testsuites><testsuite")
    status, _, (missing, broken) = summarize(tmp_path, ["a\t0\t0\t3\t1\t", "b\t0\t0\t3\t1\t"])
    assert status == 1
    assert "no readable JUnit XML" in missing.why
    assert "no readable JUnit XML" in broken.why


def test_a_rig_that_did_not_start_fails_in_ci_only(tmp_path: Path) -> None:
    row = "libvirt-2hosts\trig\t0\t\t0\tthe second libvirtd did not start: unshare: permission denied"
    assert summarize(tmp_path, [row], ci=True)[2][0].verdict == "FAIL"
    status, table, (run,) = summarize(tmp_path, [row], ci=False)
    assert (status, run.verdict) == (0, "not run")
    assert "the second libvirtd did not start" in table


def test_a_run_that_could_not_run_fails_everywhere(tmp_path: Path) -> None:
    row = "revert-debian-13-riscv64\tbroken\t0\t\t0\tbuilding debian-13-riscv64 failed with status 1"
    status, _, (run,) = summarize(tmp_path, [row], ci=False)
    assert (status, run.verdict, run.why) == (1, "FAIL", "building debian-13-riscv64 failed with status 1")


def test_skipped_tests_are_named_when_they_fail_a_run(tmp_path: Path) -> None:
    junit(tmp_path / "r.xml", passed=1, skipped=1)
    _, table, _ = summarize(tmp_path, ["r\t0\t0\t2\t1\t"])
    assert "skipped t::skip0: no rig" in table


def test_failed_tests_are_named_with_their_message_under_the_table(tmp_path: Path) -> None:
    junit(tmp_path / "r.xml", passed=1, failed=1, errors=1)
    _, table, _ = summarize(tmp_path, ["r\t1\t0\t3\t1\t"])
    assert "    failed t::bad0: x" in table.splitlines()
    assert "    failed t::err0: e" in table.splitlines()


@pytest.mark.parametrize(("output", "count"), [
    ("a.py::t1\na.py::t2\n\n2 tests collected in 0.1s\n", 2),
    ("========== 813 tests collected in 3.20s ==========\n", 813),
    ("5/9 tests collected (4 deselected) in 0.2s\n", 5),
    ("1 test collected in 0.01s\n", 1),
    ("no tests collected in 0.01s\n", 0),
    ("ERROR: file or directory not found: nowhere\n", None),
])
def test_collected_counts_pytests_own_line(output: str, count: int | None) -> None:
    assert runs.collected(output) == count


def test_the_command_line_prints_the_table_and_fails(tmp_path: Path) -> None:
    junit(tmp_path / "ok.xml", passed=2)
    (tmp_path / "runs.tsv").write_text("ok\t0\t0\t2\t3\t\nlost\trig\t0\t\t0\tno libvirtd\n")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "runs.py"), "summary", str(tmp_path)],
                            capture_output=True, text=True, env={"CI": "true", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "scripts/test: FAILED: lost" in result.stdout
    assert "lost: FAIL: no libvirtd" in result.stdout
