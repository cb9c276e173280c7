"""The ``pytest-vmfixtures`` command: see, build and prune cached images; check the host.

Building ahead of a test run (a CI step that can be cached, say) and pruning
what older recipes left behind are cache chores that should not need a
pytest run. Exit status 0 means done; 1 means an error, told in one line on
stderr (a build's tool output follows on the next lines).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .backends.libvirt.uris import DEFAULT_LIBVIRT_POOL
from .errors import VMError
from .images.byo import is_byo
from .images.cache import Cache, default_cache_dir, ensure_image, image_key
from .images.catalog import BUILTIN_IMAGES_DIR, available_recipes, load_recipe
from .images.prune import created_at, plan, remove, tree_size
from .images.recipe import Recipe
from .options import BACKENDS, image_matrix

PROG = "pytest-vmfixtures"


class CLIError(Exception):
    """A usage or state problem the user fixes; main prints it as one line."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.run is None:  # a command without its action: show what it takes
        args.usage.print_help(sys.stderr)
        return 1
    try:
        return int(args.run(args))
    except BrokenPipeError:  # the reader went away (| head): not an error of ours
        # Python flushes stdout at exit, which would raise again: point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (CLIError, VMError) as exc:
        first, _, rest = str(exc).partition("\n")
        print(f"{PROG}: error: {first}", file=sys.stderr)
        if rest:
            print(rest, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Manage pytest-vmfixtures guest images and check the host.")
    parser.set_defaults(run=None, usage=parser)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    images = commands.add_parser("images", help="list, build and prune cached images")
    images.set_defaults(usage=images)
    image_commands = images.add_subparsers(title="image commands", metavar="ACTION")

    def cache_options(command: argparse.ArgumentParser) -> None:
        command.add_argument("--cache", type=Path, default=None, metavar="DIR",
                             help="the cache (default: ~/.cache/pytest-vmfixtures, as the plugin's --vm-cache)")
        command.add_argument("--images-dir", type=Path, action="append", default=[], metavar="DIR",
                             help="extra directory of image recipes, as the plugin's --vm-images-dir (repeatable)")

    listing = image_commands.add_parser("list", help="recipes, and whether and where each is built")
    cache_options(listing)
    listing.set_defaults(run=_list)
    build = image_commands.add_parser("build", help="build images now (a cached image is only checked)")
    cache_options(build)
    build.add_argument("names", nargs="+", metavar="NAME", help="recipe names, as in --vm-image")
    build.set_defaults(run=_build)
    prune = image_commands.add_parser(
        "prune", help="remove images of older recipes, states of removed images, interrupted builds"
    )
    cache_options(prune)
    prune.add_argument("--all", action="store_true", help="remove every image, state, download and seed not in use")
    prune.add_argument("--older-than", type=float, metavar="DAYS",
                       help="also remove saved states made, and seeds last used, more than DAYS days ago")
    prune.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    prune.set_defaults(run=_prune)
    doctor = commands.add_parser("doctor", help="check that this host can run guests, and how fast")
    doctor.add_argument("--cache", type=Path, default=None, metavar="DIR", help="the cache to check")
    doctor.add_argument("--image", action="append", default=[], metavar="NAME",
                        help="check what running this image needs, as the plugin's --vm-image (repeatable; "
                             "default: debian-12); other images' missing tools are information only")
    doctor.add_argument("--images-dir", type=Path, action="append", default=[], metavar="DIR",
                        help="extra directory of image recipes, as the plugin's --vm-images-dir (repeatable)")
    doctor.add_argument("--backend", choices=BACKENDS, default="qemu", help="what runs the guests, as --vm-backend")
    doctor.add_argument("--accel", default="auto", help="the acceleration to check: auto, kvm or tcg")
    doctor.add_argument("--qemu-binary", default="qemu-system-x86_64", help="the QEMU system emulator to check")
    doctor.add_argument("--libvirt-uri", action="append", default=[], metavar="URI",
                        help="also check this libvirt connection (repeatable)")
    doctor.add_argument("--libvirt-pool", default=DEFAULT_LIBVIRT_POOL, metavar="NAME",
                        help="the storage pool remote libvirt hosts need (default: vmfixtures)")
    doctor.add_argument("--libvirt-network", default=None, metavar="NAME",
                        help="also check the libvirt network snapshot mode's guests are reached on (and dnsmasq)")
    doctor.set_defaults(run=_doctor)
    return parser


def _cache(args: argparse.Namespace) -> Cache:
    return Cache((args.cache or default_cache_dir()).expanduser())


def _dirs(args: argparse.Namespace) -> list[Path]:
    """User directories first, as the plugin orders them, so theirs shadow built-in recipes."""
    return [*(Path(d).expanduser() for d in args.images_dir), BUILTIN_IMAGES_DIR]


def _recipes(dirs: Sequence[Path]) -> tuple[dict[str, Recipe], dict[str, str]]:
    """Every recipe that loads, and the error of each one that does not."""
    recipes: dict[str, Recipe] = {}
    broken: dict[str, str] = {}
    for name in available_recipes(dirs):
        try:
            recipes[name] = load_recipe(name, dirs)
        except VMError as exc:
            broken[name] = str(exc).partition("\n")[0]
    return recipes, broken


def _current_keys(recipes: dict[str, Recipe]) -> dict[str, str]:
    """The cache key each recipe's image has now."""
    return {name: image_key(name, recipe.digest) for name, recipe in recipes.items()}


def _list(args: argparse.Namespace) -> int:
    cache = _cache(args)
    recipes, broken = _recipes(_dirs(args))
    keys = _current_keys(recipes)
    built = {p.parent.name: p.parent for p in cache.images.glob("*/manifest.json")} if cache.images.is_dir() else {}
    rows = [("NAME", "STATUS", "SIZE", "AGE", "DESCRIPTION / PATH")]
    for name in sorted({*recipes, *broken}):
        if name in broken:
            rows.append((name, "broken", "-", "-", broken[name]))
            continue
        recipe = recipes[name]
        directory = built.get(keys[name])
        older = [key for key in built if key.rsplit("-", 1)[0] == name and key != keys[name]]
        if directory is None:
            status = "outdated" if older else "-"
            rows.append((name, status, "-", "-", recipe.description))
            continue
        rows.append((name, "built", _size(tree_size(directory)), _age(created_at(directory)), recipe.description))
        rows.append(("", "", "", "", str(directory)))
    _table(rows)
    cloud = _cloud_rows(cache)
    if len(cloud) > 1:
        print("\ncloud images (your own disks and their seeds):")
        _table(cloud)
    print(f"\ncache {cache.root}: {_size(_usage(cache))}; prune with: {PROG} images prune")
    if broken:
        name = sorted(broken)[0]
        raise CLIError(f"recipe {name}: {broken[name]}")
    return 0


def _build(args: argparse.Namespace) -> int:
    cache, dirs = _cache(args), _dirs(args)
    known = available_recipes(dirs)
    unknown = [name for name in args.names if name not in known]
    if unknown:
        raise CLIError(f"unknown image {unknown[0]!r}; available: {', '.join(known)} (or pass --images-dir DIR)")
    cache.ensure_writable()
    for name in args.names:
        started = time.monotonic()
        image = ensure_image(cache, name, dirs, _progress(name))
        print(f"{name}: ready in {time.monotonic() - started:.0f} s at {image.directory}", flush=True)
    return 0


def _prune(args: argparse.Namespace) -> int:
    cache, dirs = _cache(args), _dirs(args)
    if args.older_than is not None and not args.older_than >= 0:
        raise CLIError(f"--older-than must be a number of days, 0 or more, got {args.older_than:g}")
    if not cache.root.is_dir():
        print(f"nothing to prune: no cache at {cache.root}")
        return 0
    candidates, unknown = plan(cache, _current_keys(_recipes(dirs)[0]), everything=args.all, older_than_days=args.older_than)
    freed, busy = 0, 0
    verb = "would remove" if args.dry_run else "removed"
    results = ((c, True) for c in candidates) if args.dry_run else remove(cache, candidates)
    for candidate, removed in results:
        where = candidate.path.relative_to(cache.root)
        if removed:
            freed += candidate.size
            print(f"{verb} {where} ({_size(candidate.size)}): {candidate.reason}")
        else:
            busy += 1
            print(f"skipped {where}: a run is building or checking it")
    for image in unknown:
        print(f"kept {image.relative_to(cache.root)}: no recipe of that name here (pass --images-dir DIR, or --all)")
    print(f"{verb} {_size(freed)}" + (f"; {busy} busy entries skipped" if busy else ""))
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from .doctor import FAIL, run_checks, summary

    images = image_matrix(args.image, [])
    known = available_recipes(_dirs(args))
    unknown = [name for name in images if name not in known and not is_byo(name)]
    if unknown:
        raise CLIError(f"unknown image {unknown[0]!r}; available: {', '.join(known)} (or pass --images-dir DIR)")
    checks = run_checks((args.cache or default_cache_dir()).expanduser(), args.accel, args.qemu_binary, args.libvirt_uri,
                        libvirt_pool=args.libvirt_pool, local_libvirt=True, libvirt_network=args.libvirt_network,
                        images=images, image_dirs=_dirs(args), backend=args.backend)
    print(f"checking what {', '.join(images)} on the {args.backend} backend needs")
    for check in checks:
        print(check.line())
    print(summary(checks))
    return 1 if any(check.status == FAIL for check in checks) else 0


def _progress(name: str) -> Callable[[str], None]:
    def say(message: str) -> None:
        print(f"{name}: {message}", flush=True)

    return say


def _cloud_rows(cache: Cache) -> list[tuple[str, ...]]:
    """One row per cached cloud disk (downloaded or copied) and per seed, with its size and last use."""
    rows: list[tuple[str, ...]] = [("ENTRY", "KIND", "SIZE", "LAST USED", "SOURCE")]
    for kind in ("downloads", "seeds"):
        directory = cache.root / kind
        for entry in sorted(p for p in directory.iterdir() if p.is_dir()) if directory.is_dir() else ():
            try:
                meta = cache.read_manifest(entry)
            except (OSError, ValueError):
                meta = {"kind": "incomplete"}
            what = {"download": "downloaded", "copy": "copied", "seed": "seed"}.get(str(meta.get("kind")), "incomplete")
            source = meta.get("url") or meta.get("source") or (f"user {meta['user']}" if "user" in meta else "")
            rows.append((f"{kind}/{entry.name[:24]}", what, _size(tree_size(entry)), _age(entry.stat().st_mtime) + " ago",
                         str(source)))
    return rows


def _usage(cache: Cache) -> int:
    return sum(tree_size(cache.root / kind) for kind in ("images", "states", "downloads", "seeds", "tmp"))


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])


def _size(size: int) -> str:
    if size < 1024**2:
        return f"{size / 1024:.0f} KiB"
    if size < 1024**3:
        return f"{size / 1024**2:.0f} MiB"
    return f"{size / 1024**3:.1f} GiB"


def _age(when: float) -> str:
    seconds = max(0.0, time.time() - when)
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f} {unit}"
    return f"{seconds:.0f} s"
