"""Image recipes: small TOML files that say what goes into a guest image.

Recipes are data, not code, so a newcomer can read what a guest contains and
so the cache can key a built image on a digest of exactly what went into it.
A recipe may ``extends`` another one: scalars are overridden, lists
(``packages``, ``exclude_packages``, ``files``, ``commands``,
``extra_sources``) are appended, which is what a "the stock image plus my
package" recipe wants; ``exclude_packages`` is how a child drops a package
its parent lists (another kernel for another architecture, say).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ImageError
from .recipe import DEFAULT_BUILDER, Recipe, RecipeFile, parse_size

BUILTIN_IMAGES_DIR = Path(__file__).resolve().parent / "recipes"  # ships in the wheel; images/ at the repo root links here

RECIPE_SUFFIX = ".toml"

_STRING_KEYS = (
    "description",
    "distribution",
    "release",
    "version",
    "architecture",
    "init",
    "variant",
    "disk_size",
    "kernel_cmdline",
    "user",
    "mirror",
    "extends",
    "builder",
)
_LIST_KEYS = ("packages", "exclude_packages", "commands", "extra_sources")
_ALLOWED_KEYS = frozenset((*_STRING_KEYS, *_LIST_KEYS, "files"))
_REQUIRED_KEYS = (
    "distribution",
    "release",
    "version",
    "architecture",
    "init",
    "kernel_cmdline",
    "disk_size",
)
_DEFAULTS: Mapping[str, Any] = {
    "description": "",
    "variant": "apt",
    "user": "root",
    "mirror": "http://deb.debian.org/debian",
    "builder": DEFAULT_BUILDER,
}
_INITS = ("systemd", "sysvinit", "openrc", "busybox")
# mmdebstrap installs packages into a full Debian system; extract unpacks them
# into a minimal busybox system without running any package's scripts.
_BUILDERS = ("mmdebstrap", "extract")
_FILE_KEYS = frozenset(("path", "content", "mode"))
# Names become directory names and hostnames, so keep them boring.
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9.-]*$")


def available_recipes(search_dirs: Sequence[Path] = (BUILTIN_IMAGES_DIR,)) -> dict[str, Path]:
    """Map every recipe name to its file; earlier directories win.

    Putting a user's directory before the built-in one lets a project replace
    a stock image under the same name.
    """
    found: dict[str, Path] = {}
    for directory in search_dirs:
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*" + RECIPE_SUFFIX)):
            found.setdefault(path.stem, path)
    return dict(sorted(found.items()))


def load_recipe(name: str, search_dirs: Sequence[Path] = (BUILTIN_IMAGES_DIR,)) -> Recipe:
    """Load and resolve the recipe called ``name`` (a file stem in ``search_dirs``)."""
    recipes = available_recipes(search_dirs)
    merged = _resolve(name, recipes, chain=())
    return _build(name, recipes[name], merged)


def _resolve(name: str, recipes: Mapping[str, Path], chain: tuple[str, ...]) -> dict[str, Any]:
    if name in chain:
        loop = " -> ".join((*chain, name))
        raise ImageError(f"recipe 'extends' loop {loop}: make one of them stand alone")
    if name not in recipes:
        names = ", ".join(recipes) or "none"
        where = f" (extended by {chain[-1]!r})" if chain else ""
        raise ImageError(
            f"unknown image {name!r}{where}; available: {names}; "
            f"pick one or add {name}{RECIPE_SUFFIX} to an image directory"
        )
    path = recipes[name]
    raw = _read(path)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    merged = _resolve(parent, recipes, (*chain, name))
    for key, value in raw.items():
        if key in _LIST_KEYS or key == "files":
            merged[key] = [*merged.get(key, []), *value]
        else:
            merged[key] = value
    return merged


def _read(path: Path) -> dict[str, Any]:
    """Parse and type-check one file, so each error names the file that has it."""
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ImageError(f"{path}: invalid TOML: {exc}; fix the syntax there") from exc
    except OSError as exc:
        raise ImageError(f"{path}: cannot read recipe: {exc.strerror}; check the file") from exc
    if "arch" in data:
        # "arch" is the short name of "architecture"; the two must not disagree in one file.
        if "architecture" in data and data["architecture"] != data["arch"]:
            raise ImageError(f"{path}: 'arch' and 'architecture' are the same key; keep one")
        data["architecture"] = data.pop("arch")
    unknown = sorted(set(data) - _ALLOWED_KEYS)
    if unknown:
        raise ImageError(f"{path}: unknown key {unknown[0]!r}; allowed keys: {', '.join(sorted(_ALLOWED_KEYS))}")
    for key in _STRING_KEYS:
        if key in data and not isinstance(data[key], str):
            raise ImageError(f"{path}: {key!r} must be a string; quote the value")
    for key in _LIST_KEYS:
        if key in data and not _is_string_list(data[key]):
            raise ImageError(f'{path}: {key!r} must be a list of strings, like ["a", "b"]')
    if "files" in data:
        data["files"] = [_read_file_entry(path, entry) for entry in _as_list(path, data["files"])]
    return data


def _read_file_entry(path: Path, entry: Any) -> RecipeFile:
    if not isinstance(entry, dict):
        raise ImageError(f"{path}: each [[files]] entry must be a table with path and content")
    unknown = sorted(set(entry) - _FILE_KEYS)
    if unknown:
        raise ImageError(
            f"{path}: unknown [[files]] key {unknown[0]!r}; allowed keys: " + ", ".join(sorted(_FILE_KEYS))
        )
    target, content, mode = entry.get("path"), entry.get("content"), entry.get("mode", "0644")
    if not isinstance(target, str) or not target.startswith("/"):
        raise ImageError(f"{path}: [[files]] needs an absolute 'path' string, like \"/etc/x\"")
    if not isinstance(content, str):
        raise ImageError(f"{path}: [[files]] {target}: 'content' must be a string")
    if not isinstance(mode, str) or not re.fullmatch(r"0?[0-7]{3,4}", mode):
        raise ImageError(f"{path}: [[files]] {target}: 'mode' must be an octal string like \"0644\"")
    return RecipeFile(path=target, content=content, mode=int(mode, 8))


def _as_list(path: Path, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ImageError(f"{path}: 'files' must be an array of tables: write [[files]]")
    return value


def _is_string_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _build(name: str, path: Path, data: dict[str, Any]) -> Recipe:
    """Apply defaults and the checks that need the whole, merged recipe."""
    if not _NAME_RE.match(name):
        raise ImageError(f"{path}: image name {name!r} must be lowercase letters, digits, '-' or '.'")
    values = {**_DEFAULTS, **data}
    missing = [key for key in _REQUIRED_KEYS if key not in values]
    if missing:
        raise ImageError(f"{path}: missing key {missing[0]!r}; add it or 'extends' a recipe with it")
    if values["init"] not in _INITS:
        raise ImageError(f"{path}: init {values['init']!r} is not one of {', '.join(_INITS)}")
    if values["builder"] not in _BUILDERS:
        raise ImageError(f"{path}: builder {values['builder']!r} is not one of {', '.join(_BUILDERS)}")
    # The extract builder writes a busybox system and can run nothing inside it.
    if (values["builder"] == "extract") != (values["init"] == "busybox"):
        raise ImageError(f'{path}: init "busybox" goes with builder "extract" and only with it; set both or neither')
    if values["builder"] == "extract" and values.get("commands"):
        raise ImageError(f"{path}: the extract builder runs no commands; write what they would with [[files]]")
    excluded = set(values.get("exclude_packages", ()))
    packages = tuple(package for package in values.get("packages", ()) if package not in excluded)
    try:
        parse_size(values["disk_size"])
    except ValueError:
        raise ImageError(f'{path}: disk_size {values["disk_size"]!r} is not a size; write e.g. "3G"') from None
    return Recipe(
        name=name,
        description=values["description"],
        distribution=values["distribution"],
        release=values["release"],
        version=values["version"],
        architecture=values["architecture"],
        init=values["init"],
        variant=values["variant"],
        packages=packages,
        disk_size=values["disk_size"],
        kernel_cmdline=values["kernel_cmdline"],
        user=values["user"],
        mirror=values["mirror"],
        extra_sources=tuple(values.get("extra_sources", ())),
        files=tuple(values.get("files", ())),
        commands=tuple(values.get("commands", ())),
        builder=values["builder"],
        source=path,
    )
