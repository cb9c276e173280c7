"""A test of the tests: every test function in tests/ and examples/ can fail.

A test function passes this check if its body (nested functions included) has an ``assert`` statement or
raises AssertionError, calls ``pytest.raises``/``pytest.warns``/``pytest.deprecated_call``/``pytest.fail``, or calls one of the
helpers listed in ASSERTING_HELPERS, each known to assert or raise when what it checks does not hold.
``vm.run(..., check=True)`` alone does not count: it shows the command ran, not what it did. Test suites
written into strings for an inner pytest run are not parsed here; the outer test checks their outcome.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PYTEST_ASSERTIONS = {"raises", "warns", "deprecated_call", "fail"}

# name -> why calling it is an assertion. Helpers of this test tree are also checked below to assert.
ASSERTING_HELPERS = {
    "assert_outcomes": "pytester: fails unless the inner run's outcomes are the given counts",
    "fnmatch_lines": "pytester: fails unless the output has the given lines",
    "no_fnmatch_line": "pytester: fails if the output has the given line",
    "re_match_lines": "pytester: fails unless the output matches",
    "wait_for": "pytest_vmfixtures.waiting.wait_for: raises WaitTimeout when the condition never holds",
    "compile": "builtin compile(): raises SyntaxError on code that does not parse",
    "assert_gone": "tests/faults/test_start_faults.py: asserts the QEMU processes are gone",
    "_assert_gone": "tests/faults/test_process_faults.py: asserts the processes are gone",
    "wait_for_file": "tests/faults/conftest.py: asserts the file appears before the inner run ends",
    "_passes_on_session_libvirt": "tests/integration/test_nonroot.py: asserts the inner suite passes",
}
TREE_HELPERS = {"assert_gone", "_assert_gone", "wait_for_file", "_passes_on_session_libvirt"}


def scanned_files() -> list[Path]:
    return sorted([*(ROOT / "tests").rglob("test_*.py"), *(ROOT / "examples").rglob("test_*.py")])


def called_name(call: ast.Call) -> tuple[str | None, str]:
    """(the object's name or None, the called name) for ``obj.name(...)`` or ``name(...)``."""
    func = call.func
    if isinstance(func, ast.Attribute):
        return (func.value.id if isinstance(func.value, ast.Name) else None), func.attr
    return None, func.id if isinstance(func, ast.Name) else ""


def raises_assertion_error(node: ast.Raise) -> bool:
    exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
    return isinstance(exc, ast.Name) and exc.id == "AssertionError"


def can_fail(function: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    for node in ast.walk(function):
        if isinstance(node, ast.Assert) or (isinstance(node, ast.Raise) and raises_assertion_error(node)):
            return True
        if isinstance(node, ast.Call):
            owner, name = called_name(node)
            if (owner == "pytest" and name in PYTEST_ASSERTIONS) or name in ASSERTING_HELPERS:
                return True
    return False


def functions(path: Path) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]


def test_every_test_function_can_fail() -> None:
    files = scanned_files()
    assert len(files) > 50, "the scan should see the whole test tree"
    offenders = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"
                 for path in files for node in functions(path)
                 if node.name.startswith("test") and not can_fail(node)]
    assert offenders == [], ("test functions with no assert, no pytest.raises/warns/fail and no helper known to "
                             "assert (ASSERTING_HELPERS in this file):\n" + "\n".join(offenders))


def test_the_helpers_of_this_tree_listed_as_asserting_do_assert() -> None:
    defined = {node.name: node for path in sorted((ROOT / "tests").rglob("*.py")) for node in functions(path)
               if node.name in TREE_HELPERS}
    assert set(defined) == TREE_HELPERS, "a listed helper is gone or renamed: update ASSERTING_HELPERS"
    assert [name for name, node in defined.items() if not can_fail(node)] == []


def test_the_check_catches_a_test_that_cannot_fail(tmp_path: Path) -> None:
    source = tmp_path / "test_sample.py"
    source.write_text(
        "import pytest\n"
        "def test_only_runs(vm):\n    vm.run('true', check=True)\n"
        "def test_asserts(vm):\n    assert vm.run('true').ok\n"
        "def test_raises():\n    with pytest.raises(ValueError):\n        int('x')\n"
        "def test_helper(result):\n    result.assert_outcomes(passed=1)\n"
        "def test_a_raises_of_another_module(thing):\n    thing.raises()\n"
        "def test_raises_assertion_error(x):\n    if x:\n        raise AssertionError(x)\n"
    )
    verdicts = {node.name: can_fail(node) for node in functions(source)}
    assert verdicts == {"test_only_runs": False, "test_asserts": True, "test_raises": True, "test_helper": True,
                        "test_a_raises_of_another_module": False, "test_raises_assertion_error": True}
