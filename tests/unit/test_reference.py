"""docs/reference.md against the code: each option, marker key, handle attribute, fixture, hook and
exception has its line there, and a missing one fails with the line to add."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import pytest_vmfixtures
from pytest_vmfixtures import errors, hookspecs
from pytest_vmfixtures.cli import _parser
from pytest_vmfixtures.command import CommandResult
from pytest_vmfixtures.guest import VM, GuestState
from pytest_vmfixtures.options import DEFAULT_CPUS, DEFAULT_MEMORY_MB, MARKER_KEYS
from pytest_vmfixtures.plugin import _OPTIONS

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "reference.md"
TEXT = PAGE.read_text()


def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", TEXT, re.M | re.S)
    assert match, f"docs/reference.md has no section '## {title}'"
    return match.group(1)


def rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            for line in text.splitlines() if line.startswith("| ") and not line.startswith("|---")]


@pytest.mark.parametrize("option, ini, kind, default", [o[:4] for o in _OPTIONS], ids=[o[0] for o in _OPTIONS])
def test_every_option_has_its_row_with_ini_type_and_default(option: str, ini: str, kind: str, default: object) -> None:
    table = {re.match(r"`(--[a-z0-9-]+)", r[0]).group(1): r for r in rows(section("Options and ini keys"))  # type: ignore[union-attr]
             if re.match(r"`--", r[0])}
    shown = f"`{default}`" if default not in ([], "", False) else "none"
    add = f"| `{option}=VALUE` | `{ini}` | {kind} | {shown} | what it does |"
    assert option in table, f"docs/reference.md, Options and ini keys: add the row\n{add}"
    row = table[option]
    assert row[1] == f"`{ini}`" and row[2] == kind, f"docs/reference.md: the row of {option} should begin\n{add}"
    if default not in ([], "", False):
        assert f"`{default}`" in row[3], f"docs/reference.md: {option}'s default is {default!r}; write {shown}"


@pytest.mark.parametrize("key", MARKER_KEYS)
def test_every_marker_key_has_its_row(key: str) -> None:
    keys = {re.match(r"`(\w+)`", r[0]).group(1): r for r in rows(section("The `vm` marker")) if r[0].startswith("`")}  # type: ignore[union-attr]
    assert key in keys, f"docs/reference.md, The `vm` marker: add the row\n| `{key}` | default | what it does |"


def test_the_marker_defaults_are_the_codes() -> None:
    keys = {re.match(r"`(\w+)`", r[0]).group(1): r[1] for r in rows(section("The `vm` marker")) if r[0].startswith("`")}  # type: ignore[union-attr]
    assert keys["memory_mb"] == f"`{DEFAULT_MEMORY_MB}`" and keys["cpus"] == f"`{DEFAULT_CPUS}`"
    assert keys["network"] == '`"restricted"`'


def handle_names() -> set[str]:
    """VM's public properties and methods, and the public attributes its __init__ sets."""
    names = {name for name in vars(VM) if not name.startswith("_")}
    tree = ast.parse(inspect.getsource(VM.__init__).strip())
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self" \
                and isinstance(node.ctx, ast.Store) and not node.attr.startswith("_"):
            names.add(node.attr)
    return names


@pytest.mark.parametrize("name", sorted(handle_names()))
def test_every_public_handle_attribute_has_a_line(name: str) -> None:
    cited = set(re.findall(r"`vm\.(\w+)", section("The handle: `VM`")))
    kind = "method" if callable(getattr(VM, name, None)) else "attribute"
    line = f"| `vm.{name}{'(...)' if kind == 'method' else ''}` | what it is |"
    assert name in cited, f"docs/reference.md, The handle: `VM`: add the {kind}'s row\n{line}"


def test_command_result_fields_are_listed() -> None:
    text = section("The handle: `VM`")
    fields = {*CommandResult.__dataclass_fields__, "ok", "check"}
    missing = sorted(f for f in fields if f".{f}`" not in text and f".{f}()`" not in text)
    assert not missing, f"docs/reference.md: add CommandResult's {missing} to the line under the handle's table"


def test_guest_states_are_listed() -> None:
    line = next(r for r in rows(section("The handle: `VM`")) if r[0] == "`vm.state`")
    assert all(f"`{state.value}`" in line[1] for state in GuestState), line


@pytest.mark.parametrize("name", ["vm", "vm_factory", "vm_network"])
def test_every_fixture_has_its_row_with_its_scope(name: str, request: pytest.FixtureRequest) -> None:
    definitions = request._fixturemanager.getfixturedefs(name, request.node)
    assert definitions, f"no fixture {name}"
    scope = definitions[-1].scope
    table = {r[0]: r for r in rows(section("Fixtures"))}
    assert f"`{name}`" in table, f"docs/reference.md, Fixtures: add the row\n| `{name}` | {scope} | what it gives |"
    assert table[f"`{name}`"][1] == scope, f"docs/reference.md: {name} is {scope}-scoped"


@pytest.mark.parametrize("hook", [n for n in vars(hookspecs) if n.startswith("pytest_vm_")])
def test_every_hook_has_its_row(hook: str) -> None:
    assert f"`{hook}(" in section("Hooks"), f"docs/reference.md, Hooks: add the row\n| `{hook}(...)` | when |"


def exceptions() -> list[str]:
    return [name for name, value in vars(errors).items()
            if isinstance(value, type) and issubclass(value, errors.VMError) and name in pytest_vmfixtures.__all__]


@pytest.mark.parametrize("name", exceptions())
def test_every_exception_has_its_row(name: str) -> None:
    table = {r[0] for r in rows(section("Exceptions"))}
    assert f"`{name}`" in table, f"docs/reference.md, Exceptions: add the row\n| `{name}` | raised when |"


def test_every_exported_exception_is_in_the_tree() -> None:
    exported = {n for n in pytest_vmfixtures.__all__
                if isinstance(getattr(pytest_vmfixtures, n), type) and issubclass(getattr(pytest_vmfixtures, n), BaseException)}
    assert exported == set(exceptions()), "an exported exception is not a VMError of errors.py"


def test_every_console_command_and_doctor_option_is_named() -> None:
    text = section("The `pytest-vmfixtures` command")
    parser = _parser()
    commands = {a.dest: a for a in parser._actions}
    subparsers = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))
    for name, command in subparsers.choices.items():  # type: ignore[union-attr]
        nested = [a for a in command._actions if isinstance(a.choices, dict)]
        for sub in nested[0].choices if nested else [None]:
            words = f"pytest-vmfixtures {name}" + (f" {sub}" if sub else "")
            assert f"`{words}" in text, f"docs/reference.md: add a row for `{words}`"
    doctor = subparsers.choices["doctor"]  # type: ignore[index]
    for action in doctor._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help":
                assert f"`{flag}`" in text or f"[{flag} " in text or f"`{flag} " in text, \
                    f"docs/reference.md: name doctor's {flag} in the line under the command table"
    assert commands
