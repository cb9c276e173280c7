"""The layout's rules, checked on the source (docs/architecture.md states them).

Each module's imports are read with :mod:`ast`, not by importing it, so a rule
broken in a function-level import fails here too. Imports under
``if TYPE_CHECKING:`` count like any other: they never run, but the dependency
they stand for is real (a reader, and an import-graph drawing, sees them).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pytest_vmfixtures"
ROOT = "pytest_vmfixtures"
MAX_LINES = 450
MAX_FUNCTION_LINES = 60  # from the first decorator to the last line, docstring included


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = [package.name, *path.relative_to(package).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, package: Path = PACKAGE) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from x import y`` also counts x.y)."""
    name = module_name(path, package)
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join([*base, child.module] if child.module else base)
                else:
                    target = child.module or ""
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in child.names)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return found


def _modules(package: Path = PACKAGE) -> dict[str, set[str]]:
    return {module_name(path, package): imports_of(path, package) for path in sorted(package.rglob("*.py"))}


MODULES = _modules()


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _violations(rule_from: str, forbidden: tuple[str, ...], modules: dict[str, set[str]] = MODULES) -> list[str]:
    return sorted(
        f"{module} imports {target}"
        for module, targets in modules.items()
        if _within(module, rule_from)
        for target in targets
        if any(_within(target, banned) for banned in forbidden)
    )


PYTEST_SIDE = ("pytest", "_pytest", f"{ROOT}.plugin", f"{ROOT}.fixtures", f"{ROOT}.session", f"{ROOT}.hookspecs")
PYTEST_FACE = (*PYTEST_SIDE, f"{ROOT}.cli", f"{ROOT}.doctor")
ABOVE_BACKENDS = (*PYTEST_FACE, f"{ROOT}.options", f"{ROOT}.instance", f"{ROOT}.pool", f"{ROOT}.guest")
RULES = [
    pytest.param(f"{ROOT}.backends", ABOVE_BACKENDS, id="backends know no pytest face, options or guest layer"),
    pytest.param(f"{ROOT}.channels", ("libvirt", f"{ROOT}.backends", f"{ROOT}.pool", f"{ROOT}.guest"),
                 id="channels know no hypervisor"),
    pytest.param(f"{ROOT}.images", (*PYTEST_SIDE, "libvirt", f"{ROOT}.backends", f"{ROOT}.guest", f"{ROOT}.pool"),
                 id="images need no backend"),
]


@pytest.mark.parametrize(("rule_from", "forbidden"), RULES)
def test_import_rule(rule_from: str, forbidden: tuple[str, ...]) -> None:
    assert _violations(rule_from, forbidden) == []


def test_the_vm_handle_reaches_backends_only_through_the_protocol() -> None:
    reached = {target for target in MODULES[f"{ROOT}.guest"] if _within(target, f"{ROOT}.backends")}
    assert reached <= {f"{ROOT}.backends", f"{ROOT}.backends.base"} | {
        target for target in reached if target.startswith(f"{ROOT}.backends.base.")
    }


def _internal_graph(modules: dict[str, set[str]]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``from pkg import name`` resolved to pkg.name or pkg)."""
    graph: dict[str, set[str]] = {}
    for module, targets in modules.items():
        edges = set()
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != module and not _within(module, target):
                edges.add(target)
        graph[module] = edges
    return graph


def find_cycle(modules: dict[str, set[str]]) -> list[str]:
    """One import loop among ``modules`` (as a path that starts and ends at the same module), or []."""
    graph = _internal_graph(modules)
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state and (cycle := walk(start)):
            return cycle
    return []


def test_no_import_loop() -> None:
    assert find_cycle(MODULES) == []


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_reaches(path: Path, package: Path = PACKAGE) -> set[tuple[str, str]]:
    """(module, what) for each use of another module's ``_private`` name in ``path``.

    ``from .x import _y`` of the package's own modules, and ``something._y`` where ``_y`` is not
    defined in this module (a friend's use of a name its own module defines is fine) and
    ``something`` is not ``self``/``cls``.
    """
    name = module_name(path, package)
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    defined: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            defined.add(node.attr)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
    found: set[tuple[str, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or _within(node.module or "", ROOT)):
            found.update((name, f"import {alias.name}") for alias in node.names if _is_private(alias.name))
        elif (isinstance(node, ast.Attribute) and _is_private(node.attr) and node.attr not in defined
              and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
            found.add((name, ast.unparse(node)))
    return found


# Each allowed reach into a private name, and why.
PRIVATE_EXCEPTIONS = {
    (f"{ROOT}.plugin", "import _vm_image"): "pytest registers a fixture only if the plugin module holds it",
    (f"{ROOT}.session", "self.config._tmp_path_factory"): "pytest's own (no public way to its basetemp factory)",
    (f"{ROOT}.pool", "vm._instance"): "Pool.keep needs the machine without VM.machine marking the guest dirty; "
                                      "guest.py has no read-only accessor yet",
}


def test_no_module_uses_another_modules_private_names() -> None:
    found = set().union(*(private_reaches(path) for path in sorted(PACKAGE.rglob("*.py"))))
    assert sorted(found - PRIVATE_EXCEPTIONS.keys()) == []
    assert sorted(PRIVATE_EXCEPTIONS.keys() - found) == []  # an exception no longer needed goes from the list


def test_no_module_is_long() -> None:
    lengths = {path.relative_to(PACKAGE).as_posix(): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert {name: lines for name, lines in lengths.items() if lines > MAX_LINES} == {}


def long_functions(package: Path = PACKAGE, limit: int = MAX_FUNCTION_LINES) -> dict[str, int]:
    """Every function or method longer than ``limit`` lines, as ``module:line name``."""
    found: dict[str, int] = {}
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                start = min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)])
                lines = (node.end_lineno or node.lineno) - start + 1
                if lines > limit:
                    found[f"{path.relative_to(package).as_posix()}:{node.lineno} {node.name}"] = lines
    return found


def test_no_function_is_long() -> None:
    """A long function reads better as named steps (docs/architecture.md); there is no exception list."""
    assert long_functions() == {}


# The checks above must be able to fail: each is run once on a small package made to break it.


def _make_package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / ROOT
    for relative, text in {"__init__.py": "", **files}.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    return root


def test_a_backend_importing_pytest_is_caught(tmp_path: Path) -> None:
    root = _make_package(tmp_path, {
        "backends/__init__.py": "",
        "backends/qemu.py": "def f():\n    import pytest\n",
        "backends/base.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pytest\n",
    })
    assert _violations(f"{ROOT}.backends", PYTEST_SIDE, _modules(root)) == [
        f"{ROOT}.backends.base imports pytest", f"{ROOT}.backends.qemu imports pytest",
    ]


def test_a_backend_importing_options_or_the_guest_layer_is_caught(tmp_path: Path) -> None:
    root = _make_package(tmp_path, {
        "backends/__init__.py": "",
        "backends/a.py": "from ..options import DEFAULT\n",
        "backends/b.py": "from ...pytest_vmfixtures import instance\n",
        "backends/c.py": "from .. import errors\n",
        "options.py": "DEFAULT = 1\n", "instance.py": "", "errors.py": "",
    })
    assert _violations(f"{ROOT}.backends", ABOVE_BACKENDS, _modules(root)) == [
        f"{ROOT}.backends.a imports {ROOT}.options", f"{ROOT}.backends.a imports {ROOT}.options.DEFAULT",
        f"{ROOT}.backends.b imports {ROOT}.instance",
    ]


def test_a_loop_through_a_type_checking_import_is_caught(tmp_path: Path) -> None:
    root = _make_package(tmp_path, {
        "a.py": "from .b import f\n",
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\n",
    })
    assert find_cycle(_modules(root)) == [f"{ROOT}.a", f"{ROOT}.b", f"{ROOT}.a"]


def test_private_reaches_are_caught_and_a_friend_use_is_not(tmp_path: Path) -> None:
    root = _make_package(tmp_path, {
        "owner.py": "class Owner:\n    def _forget(self) -> None: ...\n    def use(self, o: 'Owner') -> None:\n"
                    "        o._forget()\n",
        "user.py": "from .owner import _helper\nfrom . import owner\n"
                   "def f(backend, self):\n    backend._forget()\n    owner._helper()\n    self._mine()\n",
    })
    assert private_reaches(root / "owner.py", root) == set()
    assert private_reaches(root / "user.py", root) == {
        (f"{ROOT}.user", "import _helper"), (f"{ROOT}.user", "backend._forget"), (f"{ROOT}.user", "owner._helper"),
    }


def test_a_loop_and_a_relative_import_are_resolved(tmp_path: Path) -> None:
    root = _make_package(tmp_path, {
        "images/__init__.py": "",
        "images/a.py": "from .b import thing\n",
        "images/b.py": "from ..images import a\n",
        "images/c.py": "from . import b\n",
    })
    modules = _modules(root)
    assert f"{ROOT}.images.b" in modules[f"{ROOT}.images.c"]
    assert find_cycle(modules) == [f"{ROOT}.images.a", f"{ROOT}.images.b", f"{ROOT}.images.a"]


def test_a_long_function_is_caught_and_a_nested_one_counted_on_its_own(tmp_path: Path) -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES - 1))
    package = _make_package(tmp_path, {
        "fits.py": f"def fits():\n{body}",
        "long.py": f"@staticmethod\ndef long():\n{body}",
        "nested.py": f"class C:\n    def method(self):\n        def inner():\n{body.replace('    ', '            ')}\n",
    })
    found = long_functions(package)
    assert found == {"long.py:2 long": MAX_FUNCTION_LINES + 1, "nested.py:2 method": MAX_FUNCTION_LINES + 1}
