"""The documentation against the code: its Python compiles, its complete examples run against a real
guest, the names docs/architecture.md cites exist, and its host package list covers what doctor checks.

A block is a complete example when its first line names the file it is (``# test_x.py``,
``# tests/test_x.py`` or ``# conftest.py``): test files run together in one pytest run, each conftest in a
run of its own beside a one-test file. Other blocks are fragments and only compile.
"""

from __future__ import annotations

import ast
import functools
import importlib
import re
from pathlib import Path

import pytest

from pytest_vmfixtures import doctor
from pytest_vmfixtures.arch import ARCHES
from pytest_vmfixtures.fixtures import SESSION_KEY
from pytest_vmfixtures.images.catalog import load_recipe

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
HEADER = re.compile(r"^# ((?:tests/)?(?:test_\w+|conftest)\.py)\n")
GENERIC_TEST = "def test_a_guest_runs_under_this_plugin(vm):\n    assert vm.run('true').ok\n"


def python_blocks(page: Path) -> list[tuple[int, str]]:
    text = page.read_text()
    return [(text[:m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```", text, re.M | re.S)]


ALL_BLOCKS = [(page, line, code) for page in PAGES for line, code in python_blocks(page)]
TEST_FILES = [(p, line, code) for p, line, code in ALL_BLOCKS if (m := HEADER.match(code)) and "conftest" not in m.group(1)]
CONFTESTS = [(p, line, code) for p, line, code in ALL_BLOCKS if (m := HEADER.match(code)) and "conftest" in m.group(1)]


def where(page: Path, line: int) -> str:
    return f"{page.relative_to(ROOT)}:{line}"


@pytest.mark.parametrize("page, line, code", ALL_BLOCKS, ids=[where(p, n) for p, n, _ in ALL_BLOCKS])
def test_every_python_block_compiles(page: Path, line: int, code: str) -> None:
    try:
        compile(code, where(page, line), "exec")
    except SyntaxError as exc:
        raise AssertionError(f"{where(page, line + (exc.lineno or 1) - 1)}: {exc.msg}: a Python block must compile "
                             "(write a fragment as a whole statement, or use a plain ``` block)") from None


def test_the_runnable_examples_are_found() -> None:
    """The header convention is what selects them: losing it would quietly run nothing."""
    assert len(TEST_FILES) >= 8 and len(CONFTESTS) >= 4, (len(TEST_FILES), len(CONFTESTS))
    hooks = [code for page, _, code in CONFTESTS if page.name == "hooks.md"]
    assert any("pytest_vm_make_backend" in code for code in hooks) and any("pytest_vm_ready" in code for code in hooks)


# -- names docs/architecture.md cites ---------------------------------------------------------------------

# Names the page uses for an object rather than a module: what they stand for.
STANDS_FOR = {"Pool": "pool.Pool", "Slot": "slot.Slot", "VM": "guest.VM", "Runtime": "runtime.Runtime",
              "image": "images.image.BuiltImage", "backend": "backends.base.Backend", "byo": "images.byo",
              "cache": "images.cache"}
PACKAGES = ("pytest_vmfixtures", "pytest_vmfixtures.images", "pytest_vmfixtures.backends")


STDLIB = ("typing", "atexit", "ast", "os", "pathlib")


def resolve_cited(dotted: str) -> object:
    first, _, rest = dotted.partition(".")
    if first in STDLIB:
        return getattr(importlib.import_module(first), rest)
    dotted = f"{STANDS_FOR[first]}.{rest}" if first in STANDS_FOR else dotted
    parts = dotted.split(".")
    for package in PACKAGES:
        for cut in range(len(parts), 0, -1):
            try:
                obj: object = importlib.import_module(".".join([package, *parts[:cut]]))
            except ModuleNotFoundError:
                continue
            for attr in parts[cut:]:
                fields = getattr(obj, "__dataclass_fields__", {}) or getattr(obj, "__annotations__", {})
                if not hasattr(obj, attr) and attr not in fields:
                    raise AssertionError(f"docs/architecture.md cites `{dotted}`: {attr} is not in {'.'.join(parts[:cut])}")
                home = getattr(getattr(obj, attr, None), "__module__", None)
                if isinstance(obj, type(importlib)) and home and home != obj.__name__:
                    raise AssertionError(f"docs/architecture.md cites `{dotted}`, which lives in {home}, not {obj.__name__}")
                obj = getattr(obj, attr, None)
            return obj
    raise AssertionError(f"docs/architecture.md cites `{dotted}`, which names no module of pytest_vmfixtures")


def cited() -> list[str]:
    names = set(re.findall(r"`([A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)+)`", (ROOT / "docs" / "architecture.md").read_text()))
    return sorted(n for n in names if not n.endswith((".py", ".json", ".qcow2", ".toml")))


@pytest.mark.parametrize("name", cited())
def test_a_name_architecture_md_cites_exists(name: str) -> None:
    resolve_cited(name)


def test_a_file_architecture_md_cites_exists() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    package = ROOT / "pytest_vmfixtures"
    for path in set(re.findall(r"`((?:[\w-]+/)*[\w-]+\.py)`", text)):
        found = (ROOT / path).exists() or (package / path).exists() or any(package.rglob(path))
        assert found, f"docs/architecture.md cites `{path}`, which does not exist"


def test_the_resolver_catches_a_moved_name() -> None:
    with pytest.raises(AssertionError, match="wait_ssh_ready is not in guest"):
        resolve_cited("guest.wait_ssh_ready")
    with pytest.raises(AssertionError, match="lives in pytest_vmfixtures.instance, not pytest_vmfixtures.guest"):
        resolve_cited("guest.Instance")


# -- the host packages getting-started lists ----------------------------------------------------------------

@pytest.mark.parametrize("page", ["docs/getting-started.md", "README.md"])
def test_the_install_line_installs_what_doctor_checks_for_debian_12(page: str) -> None:
    text = (ROOT / page).read_text()
    joined = re.sub(r"\\\n\s*", " ", text)
    lines = re.findall(r"apt(?:-get)? install ([^\n`]*)", joined)
    assert lines, f"{page} no longer shows an apt install line"
    listed = {word for line in lines for word in line.split() if re.fullmatch(r"[a-z0-9][a-z0-9.+-]+", word)}
    needed = {package for package, _ in doctor.image_tool_needs(rootless=True, images=["debian-12"]).values()}
    needed |= {ARCHES[load_recipe("debian-12").architecture].qemu_package, "qemu-utils"}
    missing = sorted(needed - listed - {"util-linux", "apt", "dpkg"})
    assert not missing, f"{page}'s apt install line lacks {missing}, which doctor checks for debian-12"


# -- the messages troubleshooting.md quotes ----------------------------------------------------------------

# A bullet that starts with a quoted message lists messages up to its first ": " outside quotes; in them these
# stand for a value the plugin fills in.
PLACEHOLDER = re.compile(r"""['"]?…['"]?|\b\d+\b|\b(?:NAME|N|URI|TOOL|PACKAGE|KEY|TEST|DOMAIN|DIR|PATH|URL|HOST|HINT)\b""")


def quoted_messages(text: str) -> list[str]:
    bullets = re.findall(r"^- (`.*?)(?=\n(?!  )|\Z)", text, re.M | re.S)
    messages: list[str] = []
    for bullet in bullets:
        head, quoted = [], False
        for i, char in enumerate(bullet := " ".join(bullet.split())):
            quoted ^= char == "`"
            if not quoted and bullet.startswith(": ", i):
                break
            head.append(char)
        messages += re.findall(r"`([^`]+)`", "".join(head))
    return messages


def code_strings() -> list[str]:
    """The string pieces of pytest_vmfixtures' source: each constant, split where a value is put in (an
    f-string's field, a %-format for logging)."""
    pieces: list[str] = []
    for path in sorted((ROOT / "pytest_vmfixtures").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant) else "\0" for v in node.values)
                pieces += text.split("\0")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                pieces += re.split(r"%[-#0 +]*\d*(?:\.\d+)?[sdrfgx]", node.value)
    return pieces


class CodeText:
    """Whether a piece of a message can come out of the code: as it stands in one string, or put together
    from strings where one ends in a field and the next fills it (f"waiting for {what}" and f"SSH on {name}")."""

    def __init__(self, pieces: list[str]) -> None:
        self.text = "\0".join(pieces)
        self.whole = set(pieces)
        self.starts = {p[:i] for p in pieces for i in range(1, len(p) + 1)}
        self.ends = {p[i:] for p in pieces for i in range(len(p))}

    def __contains__(self, fragment: object) -> bool:
        assert isinstance(fragment, str)
        return fragment in self.text or any(fragment[:i] in self.ends and self._filled(fragment[i:])
                                            for i in range(1, len(fragment)))

    @functools.cache  # noqa: B019 - one instance per run
    def _filled(self, rest: str) -> bool:
        return rest in self.starts or any(rest[:i] in self.whole and self._filled(rest[i:]) for i in range(1, len(rest)))


@functools.cache
def code_text() -> CodeText:
    return CodeText(code_strings())


def missing_pieces(message: str) -> list[str]:
    return [f for f in (f.strip() for f in PLACEHOLDER.split(message)) if len(f) >= 3 and f not in code_text()]


TROUBLESHOOTING = ROOT / "docs" / "troubleshooting.md"


def test_troubleshooting_quotes_messages() -> None:
    """The page's layout is what the check below reads: losing it would quietly check nothing."""
    assert len(quoted_messages(TROUBLESHOOTING.read_text())) >= 150


@pytest.mark.parametrize("message", quoted_messages(TROUBLESHOOTING.read_text()))
def test_a_message_troubleshooting_md_quotes_is_in_the_code(message: str) -> None:
    missing = missing_pieces(message)
    assert not missing, (f"docs/troubleshooting.md quotes `{message}`, but pytest_vmfixtures/ has no string with "
                         f"{missing}: write the message as the code prints it (… for a value it fills in)")


def test_the_message_check_catches_a_changed_message() -> None:
    assert missing_pieces("--vm-accel '…' is not one of …") == []
    assert missing_pieces("NAME: timed out after N s waiting for SSH on NAME") == []
    assert missing_pieces("--vm-accel '…' is not among …") == ["is not among"]
    assert missing_pieces("NAME: timed out after N s waiting for an SSH login on NAME") == ["s waiting for an SSH login on"]
    assert quoted_messages("- `a: b` / `c`: d `e`\n  `f`\n- text `g`\n- `h` (\n  `i`): j\n") == ["a: b", "c", "h", "i"]


# -- the complete examples, against a real guest ------------------------------------------------------------

def run_examples(pytester: pytest.Pytester, request: pytest.FixtureRequest, files: dict[str, str]) -> pytest.RunResult:
    cache = request.config.stash[SESSION_KEY].settings.cache_dir
    for name, code in files.items():
        (pytester.path / name).write_text(code)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly", f"--vm-cache={cache}", "-rs", "-s",
                                         "-W", "ignore::DeprecationWarning", timeout=1800)


@pytest.mark.integration
def test_the_docs_test_files_pass_against_a_real_guest(pytester: pytest.Pytester, request: pytest.FixtureRequest) -> None:
    files: dict[str, str] = {}
    for page, line, code in TEST_FILES:
        name = Path(HEADER.match(code).group(1)).name  # type: ignore[union-attr]
        assert name not in files, f"{where(page, line)}: two examples are called {name}: rename one"
        files[name] = code
    result = run_examples(pytester, request, files)
    assert result.ret == 0, "\n".join(result.outlines[-60:])
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) >= len(TEST_FILES) and not outcomes.get("failed") and not outcomes.get("error"), outcomes


@pytest.mark.integration
@pytest.mark.parametrize("page, line, code", CONFTESTS, ids=[where(p, n) for p, n, _ in CONFTESTS])
def test_a_docs_conftest_runs_against_a_real_guest(page: Path, line: int, code: str, pytester: pytest.Pytester,
                                                   request: pytest.FixtureRequest) -> None:
    result = run_examples(pytester, request, {"conftest.py": code, "test_with_it.py": GENERIC_TEST})
    assert result.ret == 0, f"{where(page, line)}:\n" + "\n".join(result.outlines[-60:] + result.errlines[-30:])
    result.assert_outcomes(passed=1)
    if "pytest_vm_make_backend" in code:
        assert "restored " in result.stdout.str(), "the example backend did not run"
    if "def pytest_vm_ready" in code:
        assert "ssh: ssh " in result.stdout.str(), "the example hook did not print"


# -- links between the pages ------------------------------------------------------------------------------

def anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    for heading in re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S), re.M):
        found.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return found


@pytest.mark.parametrize("page", [p for p in PAGES if p.name != "README.md"] + [ROOT / "CHANGELOG.md"], ids=lambda p: p.name)
def test_relative_links_and_their_anchors_resolve(page: Path) -> None:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    for link in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", link):
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.relative_to(ROOT)} links to {link}: no such file"
        if anchor and target.suffix == ".md":
            assert anchor in anchors(target), f"{page.relative_to(ROOT)} links to {link}: {target.name} has no such heading"
