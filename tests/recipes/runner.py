"""A small step runner for the CI recipes in examples/ci: their shell steps, in order, on this machine.

What it does not run, it names: the steps that need the CI service itself (checkout, the cache, artifact
upload) are skipped by name, and an action it does not know fails the run instead of being passed over.
Where the service would act, the runner stands in for it:

- the checkout is a small project with one guest test (``PROJECT_TEST``);
- the cache restore is a cache hit from an earlier run: the current ``debian-12`` image copied from the
  suite's own cache when it has one (copied, never linked: the suite's cache stays read-only);
- ``sudo`` (this host has none, and the suite runs as root) runs the command itself, except ``apt-get``:
  ``update`` does nothing and ``install`` checks that each package is installed, so the suite never changes
  the host's packages (scripts/bootstrap installs them) but a package the host lacks still fails the step;
- ``pip install pytest-vmfixtures`` finds this checkout's wheel first (``PIP_FIND_LINKS``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CI = ROOT / "examples" / "ci"
STEP_TIMEOUT = 1800

# Actions that need the CI service itself: skipped, with what stands in for each.
SERVICE_ACTIONS = {
    "actions/checkout": "the runner made the project",
    "actions/cache": "the runner restored the image cache as a hit would",
    "actions/upload-artifact": "uploads need the CI service",
}

PROJECT_TEST = '''\
def test_the_guest_is_debian_and_reverted(vm):
    assert vm.os.id == "debian"
    vm.run("rm -rf /usr/share/doc", check=True)


def test_the_next_guest_is_clean(vm):
    assert vm.run("test -d /usr/share/doc").ok
'''

SUDO_SHIM = r'''#!/bin/sh
# Stands in for sudo in the recipe runner (tests/recipes/runner.py): apt-get is checked, not run.
while [ $# -gt 0 ]; do
    case "$1" in
        *=*) export "$1"; shift ;;
        -*) shift ;;
        *) break ;;
    esac
done
if [ "$1" = apt-get ]; then
    shift
    action=""
    missing=""
    for word in "$@"; do
        case "$word" in
            -*) ;;
            update|install) action=$word ;;
            *) if [ "$action" = install ] && ! dpkg-query -W -f='${Status}' "$word" 2>/dev/null | grep -q "install ok installed"; then
                   missing="$missing $word"
               fi ;;
        esac
    done
    if [ -n "$missing" ]; then
        echo "recipe runner: the recipe installs$missing, which this host lacks (add it to scripts/bootstrap)" >&2
        exit 1
    fi
    exit 0
fi
exec "$@"
'''


@dataclass(frozen=True)
class Step:
    name: str
    script: str = ""
    skip: str | None = None  # why the runner does not run it
    always: bool = False  # runs after an earlier step failed (GitHub's if: always(), GitLab's after_script)
    shell: tuple[str, ...] = ("bash", "-e")
    restores_cache: bool = False


@dataclass
class Result:
    ran: list[tuple[str, int]] = field(default_factory=list)  # (step, exit status)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    output: str = ""

    @property
    def failed(self) -> list[str]:
        return [name for name, status in self.ran if status != 0]


def _expressions(text: str, values: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        key = match.group(1).strip()
        if key not in values:
            raise AssertionError(f"the recipe runner has no value for ${{{{ {key} }}}}: add it to its expressions")
        return values[key]

    return re.sub(r"\$\{\{(.*?)\}\}", replace, text)


def github_steps(path: Path, image: str, workspace: Path) -> tuple[dict[str, str], list[Step]]:
    """The job's environment and steps, for the matrix cell ``image``."""
    (job,) = yaml.safe_load(path.read_text())["jobs"].values()
    values = {"matrix.image": image, "github.workspace": str(workspace)}
    env = {key: _expressions(str(value), values) for key, value in job.get("env", {}).items()}
    steps = []
    for number, step in enumerate(job["steps"], 1):
        name = step.get("name") or step.get("uses") or f"step {number}"
        always = step.get("if") == "always()"
        if "uses" in step:
            action = step["uses"].split("@")[0]
            if action not in SERVICE_ACTIONS:
                raise AssertionError(f"{path.name}: {name} uses {action}, which the recipe runner does not know")
            steps.append(Step(name, skip=SERVICE_ACTIONS[action], always=always, restores_cache=action == "actions/cache"))
        else:
            steps.append(Step(name, _expressions(step["run"], values), always=always))
    return env, steps


def gitlab_steps(path: Path, image: str, project: Path) -> tuple[dict[str, str], list[Step]]:
    """The job's variables and its scripts; before_script and script share one shell, as on a runner."""
    job = yaml.safe_load(path.read_text())["vm-tests"]
    env = {"CI_PROJECT_DIR": str(project), "VM_IMAGE": image}
    for key, value in job.get("variables", {}).items():
        env[key] = os.path.expandvars(re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), m.group(0)), str(value)))
    main = "\n".join([*job.get("before_script", []), *job["script"]])
    after = "\n".join(job.get("after_script", []))
    return env, [
        Step("cache", skip="the runner restored the image cache as a hit would", restores_cache=True),
        Step("before_script + script", main),
        Step("after_script", after, always=True),
    ]


def shell_steps(path: Path) -> list[Step]:
    return [Step(path.name, f'sh "{path}"', shell=("sh", "-e"))]


def make_project(where: Path, suite_cache: Path) -> dict[str, str]:
    """The checkout a recipe runs in, and the environment that stands in for the CI service."""
    where.mkdir(parents=True)
    (where / "test_vm.py").write_text(PROJECT_TEST)
    shims = where.parent / f"{where.name}-shims"
    shims.mkdir()
    (shims / "sudo").write_text(SUDO_SHIM)
    (shims / "sudo").chmod(0o755)
    venv_bin = str(Path(sys.executable).parent)
    path = [shims.as_posix(), *(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin)]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_", "VIRTUAL_ENV", "PYTHON", "VMFX_", "GITHUB_", "CI_"))}
    env["PATH"] = os.pathsep.join(path)
    env["SUITE_CACHE"] = str(suite_cache)
    return env


def restore_cache(cache: Path, suite_cache: Path, image: str) -> str:
    """What a cache hit restores (built images): the suite's current ``image``, copied; nothing if it has none."""
    from pytest_vmfixtures.images.cache import image_key
    from pytest_vmfixtures.images.catalog import load_recipe

    key = image_key(image, load_recipe(image).digest)
    source = suite_cache / "images" / key
    if not (source / "manifest.json").is_file():
        return f"no {image} in {suite_cache}: a cold start"
    target = cache / "images" / key
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, target, copy_function=shutil.copy2)
    return f"restored {key}"


def run(steps: list[Step], env: dict[str, str], cwd: Path, wheels: Path, cache: Path, image: str) -> Result:
    """Each step in order; after a failure only the ``always`` steps run."""
    env = dict(env, PIP_FIND_LINKS=" ".join([str(wheels), *_configured_find_links()]))
    github_path, github_env = cwd.parent / f"{cwd.name}-path", cwd.parent / f"{cwd.name}-env"
    github_path.touch()
    github_env.touch()
    env.update(GITHUB_PATH=str(github_path), GITHUB_ENV=str(github_env))
    result = Result()
    for step in steps:
        if step.skip is not None:
            result.skipped.append((step.name, step.skip))
            if step.restores_cache:
                result.output += f"--- {step.name}: {restore_cache(cache, Path(env['SUITE_CACHE']), image)}\n"
            continue
        if result.failed and not step.always:
            result.skipped.append((step.name, "an earlier step failed"))
            continue
        for line in github_path.read_text().splitlines()[::-1]:
            env["PATH"] = f"{line}{os.pathsep}{env['PATH']}"
        github_path.write_text("")
        env.update(dict(_assignments(github_env.read_text())))
        proc = subprocess.run([*step.shell, "-c", step.script], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=STEP_TIMEOUT)
        result.ran.append((step.name, proc.returncode))
        result.output += f"--- {step.name}: exit {proc.returncode}\n{proc.stdout[-6000:]}{proc.stderr[-6000:]}\n"
    return result


def _assignments(text: str) -> Iterator[tuple[str, str]]:
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            yield key, value


def _configured_find_links() -> list[str]:
    """pip's configured find-links, kept behind the wheel's directory (the environment variable replaces them)."""
    found = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.find-links"], capture_output=True,
                           text=True, timeout=60)
    return found.stdout.split() if found.returncode == 0 else []


def shell_text(path: Path) -> str:
    """All the shell a recipe runs, one snippet after another (YAML recipes: each run: and script entry)."""
    if path.suffix == ".sh":
        return path.read_text()
    snippets: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "run" and isinstance(value, str):
                    snippets.append(value)
                elif key in ("script", "before_script", "after_script"):
                    snippets.extend(value if isinstance(value, list) else [value])
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(load(path))
    return "\n".join(snippets)


def doctor_calls(text: str) -> list[str]:
    """Each ``pytest-vmfixtures doctor`` command line in ``text`` (backslash continuations joined)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.strip() for line in joined.splitlines()
            if "pytest-vmfixtures" in line and " doctor" in line and not line.strip().startswith("#")]


def installed_packages(text: str) -> set[str]:
    """The Debian packages a recipe's ``apt-get install`` lines (or its comment, for the shell script) name."""
    joined = re.sub(r"\\\n[#\s]*", " ", text)
    joined = re.sub(r"\n\s+(?=[a-z0-9])", " ", joined)  # YAML's folded lines
    packages: set[str] = set()
    for match in re.finditer(r"apt-get install ([^\n]*)", joined):
        packages.update(word for word in match.group(1).split() if re.fullmatch(r"[a-z0-9][a-z0-9.+-]+", word)
                        and word != "install")
    return packages


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())
