"""The CI recipes in examples/ci/ use only what exists: options, subcommands, images, shell syntax.

Users copy these files as they are, so a renamed option or subcommand must fail here rather than in
someone's pipeline. Commands are found by reading every shell snippet of a recipe (GitHub's ``run``,
GitLab's scripts, the shell script itself) and picking out the ``pytest`` and ``pytest-vmfixtures``
invocations; those are then checked against the plugin's registered options, pytest's own ``--help``
and the console script's argument parser.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_vmfixtures.images.catalog import available_recipes
from pytest_vmfixtures.plugin import _OPTIONS

try:
    import yaml
except ImportError:  # reported by the tests that need it, as a failure: a skip would hide it
    yaml = None

ROOT = Path(__file__).resolve().parents[2]
CI = ROOT / "examples" / "ci"
GITHUB = CI / "github-actions.yml"
GITLAB = CI / "gitlab-ci.yml"
SHELL = CI / "run-tests.sh"
RECIPES = [GITHUB, GITLAB, SHELL]
CLI = "pytest-vmfixtures"

VM_OPTIONS = {option for option, *_ in _OPTIONS}
VM_VALUE_OPTIONS = {option for option, _ini, kind, *_ in _OPTIONS if kind != "bool"}
# Words that may precede the command word of a simple command.
PREFIXES = {"sudo", "env", "exec", "command", "time", "nohup", "then", "else", "elif", "do", "if", "while", "until", "!", "{", "}"}
SEPARATORS = {";", "&&", "||", "|", "&", "(", ")", ";;", "\n"}
# How the console script runs (see [project.scripts] in pyproject.toml), for when cli.py has no parser factory.
CLI_SHIM = "import sys; from pytest_vmfixtures.cli import main; sys.argv[0] = 'pytest-vmfixtures'; sys.exit(main())"


def load_yaml(path: Path) -> Any:
    if yaml is None:
        pytest.fail("PyYAML is not installed: pip install pyyaml (it belongs in the 'test' extra)")
    return yaml.safe_load(path.read_text())


# -- finding commands -----------------------------------------------------------------------------


def shell_snippets(path: Path) -> list[str]:
    """Every piece of shell a recipe runs."""
    if path.suffix == ".sh":
        return [path.read_text()]
    document = load_yaml(path)
    snippets: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "run" and isinstance(value, str):
                    snippets.append(value)
                elif key in ("script", "before_script", "after_script"):
                    items = value if isinstance(value, list) else [value]
                    for item in items:
                        assert isinstance(item, str), f"{path.name}: a {key} entry is not a string: {item!r}"
                        snippets.append(item)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(document)
    return snippets


def logical_lines(text: str) -> Iterator[str]:
    """Lines with backslash continuations joined, ``${VAR:+word}`` taken as set, comments dropped."""
    text = re.sub(r"\\\n", " ", text)
    text = re.sub(r"\$\{\w+:\+([^}]*)\}", r"\1", text)
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            yield stripped


def commands(text: str) -> Iterator[list[str]]:
    """Each simple command's words, from its command word on (assignments and prefixes skipped)."""
    for line in logical_lines(text):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        try:
            tokens = list(lexer)
        except ValueError as exc:  # an unbalanced quote: the shell would choke on it too
            raise AssertionError(f"cannot split {line!r}: {exc}") from None
        current: list[str] = []
        for token in [*tokens, "\n"]:
            if token in SEPARATORS:
                if current:
                    yield current
                current = []
                continue
            if not current and (token in PREFIXES or re.match(r"^[A-Za-z_]\w*=", token)):
                continue
            current.append(token)


def invocations(path: Path) -> list[list[str]]:
    return [words for snippet in shell_snippets(path) for words in commands(snippet)]


def is_pytest(words: list[str]) -> bool:
    program = Path(words[0]).name
    return program in ("pytest", "py.test") or (program.startswith("python") and words[1:3] == ["-m", "pytest"])


def pytest_args(words: list[str]) -> list[str]:
    return words[3:] if words[1:3] == ["-m", "pytest"] else words[1:]


def cli_calls(path: Path) -> list[list[str]]:
    """The arguments of every ``pytest-vmfixtures ...`` run (the package named in ``pip install`` is no run)."""
    return [words[1:] for words in invocations(path) if Path(words[0]).name == CLI]


SAMPLE_VALUES = {"VM_IMAGE": "debian-12", "image": "debian-12", "label": "debian-12", "VM_ACCEL": "auto", "IMAGES_DIR": "images"}


def filled(arg: str, tmp: Path) -> str:
    """``arg`` with CI and shell variables replaced by sample values: images by a recipe name, the rest by paths."""

    def expression(match: re.Match[str]) -> str:
        return "debian-12" if "image" in match.group(1) else str(tmp / "ci-value")

    def variable(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return SAMPLE_VALUES.get(name, str(tmp / name.lower()))

    arg = re.sub(r"\$\{\{(.*?)\}\}", expression, arg)
    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", variable, arg)


# -- the console script ----------------------------------------------------------------------------


def cli_parser() -> argparse.ArgumentParser | None:
    """The console script's argparse parser, if cli.py has a factory for it."""
    try:
        cli = importlib.import_module("pytest_vmfixtures.cli")
    except ModuleNotFoundError as exc:
        if exc.name == "pytest_vmfixtures.cli":
            pytest.fail("pytest_vmfixtures/cli.py is missing, but the recipes run the pytest-vmfixtures command")
        raise
    for name in ("build_parser", "make_parser", "create_parser", "get_parser", "parser", "_parser"):
        candidate = getattr(cli, name, None)
        if isinstance(candidate, argparse.ArgumentParser):
            return candidate
        if callable(candidate):
            try:
                made = candidate()
            except TypeError:
                continue
            if isinstance(made, argparse.ArgumentParser):
                return made
    return None


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def check_with_parser(parser: argparse.ArgumentParser, args: list[str]) -> None:
    """Every word naming a subcommand is one, no subcommand is left out, and argparse accepts the rest."""
    current, path = parser, []
    for word in args:
        choices = subcommands(current)
        if not choices:
            break
        if word.startswith("-"):
            continue
        assert word in choices, f"{CLI} {' '.join(path)} has no subcommand {word!r}; it has: {', '.join(sorted(choices))}"
        path.append(word)
        current = choices[word]
    left = subcommands(current)
    assert not left, f"{CLI} {' '.join(path)} needs one of: {', '.join(sorted(left))}"
    try:
        parser.parse_args(args)
    except SystemExit as exc:
        raise AssertionError(f"{CLI} {' '.join(args)}: argparse refuses it (status {exc.code})") from None


def check_with_help(args: list[str]) -> None:
    """Without a parser to inspect: ``pytest-vmfixtures <subcommands> --help`` must succeed."""
    words = []
    for word in args:
        if word.startswith("-"):
            break
        words.append(word)
    result = subprocess.run([sys.executable, "-c", CLI_SHIM, *words, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{CLI} {' '.join(words)} --help failed:\n{result.stdout}{result.stderr}"


# -- the tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_vm_option_is_a_real_option(recipe: Path) -> None:
    used = set(re.findall(r"--vm-[a-z0-9-]+", recipe.read_text()))
    assert used, f"{recipe.name} uses no --vm-* option: the recipe or this test is wrong"
    unknown = sorted(used - VM_OPTIONS)
    assert not unknown, f"{recipe.name} uses {unknown}, which the plugin does not register; it has {sorted(VM_OPTIONS)}"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_pytest_runs_are_accepted_by_pytest(recipe: Path, tmp_path: Path, pytestconfig: pytest.Config) -> None:
    """Each pytest command line, with its variables filled in, parses: options, values and all.

    It runs with ``--collect-only`` on an empty directory, so nothing is collected (status 5) and no
    guest starts; an unknown option or a bad value is a usage error (status 4) instead.
    """
    runs = [pytest_args(words) for words in invocations(recipe) if is_pytest(words)]
    assert runs, f"{recipe.name} never runs pytest"
    for args in runs:
        options = {arg.split("=", 1)[0] for arg in args if arg.startswith("--")}
        assert {"--junitxml", "--vm-artifacts"} <= options, f"{recipe.name}: a pytest run without JUnit XML or evidence"
        for flag, value in zip(args, args[1:], strict=False):
            if flag == "-o":
                key = value.split("=", 1)[0]
                try:
                    pytestconfig.getini(key)
                except ValueError:
                    raise AssertionError(f"{recipe.name}: -o {key}=...: pytest has no ini key {key!r}") from None
        suite = tmp_path / "empty-suite"
        suite.mkdir(exist_ok=True)
        concrete = [filled(arg, tmp_path) for arg in args if arg != "$@"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", *concrete, str(suite)],
            capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
        )
        assert result.returncode in (0, 5), (
            f"{recipe.name}: pytest {' '.join(concrete)} -> status {result.returncode}\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_plugin_options_carry_their_value_after_an_equals_sign(recipe: Path) -> None:
    """``--vm-cache DIR`` as two words can make DIR pytest's rootdir (plugins load after pytest picks it),
    and the project's ini file is then ignored; ``--vm-cache=DIR`` cannot."""
    for words in invocations(recipe):
        if is_pytest(words):
            split = sorted(set(pytest_args(words)) & VM_VALUE_OPTIONS)
            assert not split, f"{recipe.name}: write {split[0]}=VALUE, not {split[0]} VALUE"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_console_script_command_is_real(recipe: Path) -> None:
    calls = cli_calls(recipe)
    assert calls, f"{recipe.name} never runs {CLI}"
    parser = cli_parser()
    for args in calls:
        if parser is not None:
            check_with_parser(parser, args)
        else:
            check_with_help(args)


def test_the_console_script_is_the_one_pyproject_installs() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^pytest-vmfixtures = "pytest_vmfixtures\.cli:main"$', text, re.M), "[project.scripts] changed"


def test_matrix_images_are_built_in_recipes() -> None:
    recipes = set(available_recipes())
    github = load_yaml(GITHUB)
    (job,) = github["jobs"].values()
    gitlab_matrix = load_yaml(GITLAB)["vm-tests"]["parallel"]["matrix"]
    shell_default = re.search(r"^VM_IMAGES=\$\{VM_IMAGES:-([^}]*)\}$", SHELL.read_text(), re.M)
    assert shell_default, "run-tests.sh no longer sets a default VM_IMAGES"
    matrices = {
        GITHUB.name: job["strategy"]["matrix"]["image"],
        GITLAB.name: [image for cell in gitlab_matrix for image in cell["VM_IMAGE"]],
        SHELL.name: shell_default.group(1).split(),
    }
    for name, images in matrices.items():
        assert images, f"{name}: an empty image matrix"
        assert not set(images) - recipes, f"{name}: {sorted(set(images) - recipes)} are not recipes ({sorted(recipes)})"


def test_github_workflow_shape() -> None:
    workflow = load_yaml(GITHUB)
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert triggers, "no triggers"
    (job,) = workflow["jobs"].values()
    assert {"self-hosted", "kvm"} <= set(job["runs-on"])
    steps = job["steps"]
    uses = [step.get("uses", "") for step in steps]
    assert uses[0].startswith("actions/checkout@")
    cache = next(step for step in steps if step.get("uses", "").startswith("actions/cache@"))
    assert "hashFiles('images/*.toml')" in cache["with"]["key"]
    assert "matrix.image" in cache["with"]["key"]
    tests = next(step for step in steps if any(is_pytest(words) for words in commands(step.get("run", ""))))
    assert '--vm-image="${{ matrix.image }}"' in tests["run"]
    position = steps.index(tests)
    assert steps.index(cache) < position, "the cache must be restored before the tests"
    uploads = [step for step in steps if step.get("uses", "").startswith("actions/upload-artifact@")]
    assert {step["if"] for step in uploads} == {"always()", "failure()"}
    assert all(steps.index(step) > position for step in uploads)


def test_gitlab_job_shape() -> None:
    job = load_yaml(GITLAB)["vm-tests"]
    assert "kvm" in job["tags"]
    assert job["cache"]["key"]["files"] == ["images/*.toml"]
    assert "$VM_IMAGE" in job["cache"]["key"]["prefix"]
    assert job["artifacts"]["when"] == "always"
    assert job["artifacts"]["reports"]["junit"].startswith("reports/")
    assert any('--vm-image="$VM_IMAGE"' in line for line in job["script"])


def test_shell_script_is_posix_sh() -> None:
    text = SHELL.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert SHELL.stat().st_mode & 0o111, "run-tests.sh is not executable"
    shells = ["sh"] + [s for s in ("dash", "bash") if shutil.which(s)]
    for shell in shells:
        args = [shell, "--posix", "-n"] if shell == "bash" else [shell, "-n"]
        result = subprocess.run([*args, str(SHELL)], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"{shell} -n: {result.stderr}"


def test_command_scanner_finds_what_it_should() -> None:
    """The checks above are only as good as this: prefixes, assignments and separators are handled."""
    text = 'X=1 sudo env A=b pytest -q --vm-image "a b" && .venv/bin/pytest-vmfixtures images list\n' \
           "pip install pytest-vmfixtures  # not a run\nfoo \\\n  --bar ${V:+--vm-cache \"$D\"}\n"
    found = list(commands(text))
    assert found == [
        ["pytest", "-q", "--vm-image", "a b"],
        [".venv/bin/pytest-vmfixtures", "images", "list"],
        ["pip", "install", "pytest-vmfixtures"],
        ["foo", "--bar", "--vm-cache", "$D"],
    ]
