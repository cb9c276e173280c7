"""What ``pytest-vmfixtures images prune`` may remove from the cache, and removing it.

Nothing in the cache is ever removed by the plugin itself: an image built
from an older recipe, or a saved state of an image that is gone, stays until
someone prunes. Pruning must never break a run in progress, so it skips
every entry that a live session uses (what it recorded in ``run/<session>/uses``:
its images, seeds and saved states, with or without a guest running; and what
its guests' overlays' qcow2 backing chains and QEMU command lines name) and
every entry whose lock is taken (it is being built or checked), without
waiting for either.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..runtime import USES, pid_alive, session_lock_held
from .cache import Cache, remove_tree
from .qcow2 import backing_file

DAY = 86400.0


@dataclass(frozen=True)
class Candidate:
    """A cache entry that can go, and why."""

    path: Path
    lock: str
    reason: str
    size: int


def tree_size(path: Path) -> int:
    """Bytes on disk (allocated blocks, so a sparse disk counts what it uses)."""
    total = 0
    for item in (path, *path.rglob("*")) if path.is_dir() else (path,):
        try:
            total += item.lstat().st_blocks * 512
        except OSError:
            continue
    return total


def entries_in_use(cache: Cache) -> set[Path]:
    """Entry directories that guests of live pytest sessions use right now."""
    used: set[Path] = set()
    run = cache.root / "run"
    for session in run.iterdir() if run.is_dir() else ():
        if session.name.startswith(".") or _live(session):
            for path in _recorded_uses(session):
                entry = _entry_of(cache, path)
                if entry is not None:
                    used.add(entry)
            for machine in (p for p in session.iterdir() if p.is_dir()):
                for path in _files_used(machine):
                    entry = _entry_of(cache, path)
                    if entry is not None:
                        used.add(entry)
    return used


def _live(session: Path) -> bool:
    """A session holding its lock (whatever pid namespace it runs in); one made before locks, by its pid."""
    held = session_lock_held(session)
    if held is not None:
        return held
    try:
        meta = json.loads((session / "session.json").read_text(encoding="utf-8"))
        return isinstance(meta, dict) and pid_alive(int(meta.get("pid", 0)), meta.get("start_time"))
    except (OSError, ValueError, TypeError):
        return False


def _recorded_uses(session: Path) -> list[Path]:
    """What the session recorded it uses (runtime.Runtime.record_use): its images, seeds and states."""
    try:
        text = (session / USES).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [Path(line) for line in text.splitlines() if line.startswith("/")]


def _files_used(machine: Path) -> Iterator[Path]:
    """Every file a machine reads: its overlays' backing chains and what its QEMU command line names."""
    for overlay in machine.glob("*.qcow2"):
        layer: Path | None = overlay
        for _ in range(16):
            layer = backing_file(layer) if layer is not None else None
            if layer is None:
                break
            yield layer
    try:
        pid = int((machine / "pid").read_text(encoding="ascii").split()[0])
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace").split("\0")
    except (OSError, ValueError, IndexError):
        return
    for argument in argv:
        for part in argument.replace("=", ",").split(","):
            if part.startswith("/"):
                yield Path(part)


def _entry_of(cache: Cache, path: Path) -> Path | None:
    """The ``cache/<kind>/<key>`` directory ``path`` lies in, if any."""
    try:
        relative = path.relative_to(cache.root)
    except ValueError:
        return None
    return cache.root / relative.parts[0] / relative.parts[1] if len(relative.parts) >= 2 else None


def plan(
    cache: Cache,
    current: Mapping[str, str],
    *,
    everything: bool = False,
    older_than_days: float | None = None,
    now: float | None = None,
) -> tuple[list[Candidate], list[Path]]:
    """What to remove, and the images kept because no recipe known here names them.

    ``current`` maps each recipe name to the cache key of its current build.
    Images of other recipe names may belong to another project's recipes, so
    only ``everything`` removes them. ``older_than_days`` also removes saved
    states made, and cloud disks and seeds last used, longer ago than that.
    """
    now = time.time() if now is None else now
    cutoff = None if older_than_days is None else now - older_than_days * DAY
    used = entries_in_use(cache)
    images, unknown = _old_images(cache, current, used, everything)
    disks = _unused_disks(cache, used, everything, cutoff, older_than_days)
    gone = {path for path, _ in (*images, *disks)}
    states = _old_states(cache, used, everything, cutoff, older_than_days, gone)
    candidates = [Candidate(path, f"{path.parent.name}-{path.name}", reason, tree_size(path))
                  for path, reason in (*images, *disks, *states)]
    return candidates + _leftovers(cache), unknown


def _old_images(
    cache: Cache, current: Mapping[str, str], used: set[Path], everything: bool,
) -> tuple[list[tuple[Path, str]], list[Path]]:
    """Images to remove (built from an older recipe, or all), and those of recipes not known here."""
    remove: list[tuple[Path, str]] = []
    unknown: list[Path] = []
    for image in _entries(cache, "images", used):
        name = image.name.rsplit("-", 1)[0]
        if everything:
            remove.append((image, "--all"))
        elif name not in current:
            unknown.append(image)
        elif current[name] != image.name:
            remove.append((image, f"built from an older {name} recipe"))
    return remove, unknown


def _unused_disks(
    cache: Cache, used: set[Path], everything: bool, cutoff: float | None, older_than_days: float | None,
) -> list[tuple[Path, str]]:
    """Cloud disks, seeds and disks converted for other hypervisors, unused for the --older-than window.

    Each use touches them; never one a live session's guest reads. States sitting on a disk that goes, go with it.
    """
    remove: list[tuple[Path, str]] = []
    for kind in ("downloads", "seeds", "converted"):
        for entry in _entries(cache, kind, used):
            if everything:
                remove.append((entry, "--all"))
            elif cutoff is not None and entry.stat().st_mtime < cutoff:
                remove.append((entry, f"not used for {older_than_days:g} days"))
    return remove


def _old_states(
    cache: Cache, used: set[Path], everything: bool, cutoff: float | None, older_than_days: float | None,
    gone: set[Path],
) -> list[tuple[Path, str]]:
    """Saved states that are incomplete, whose image is gone (or goes: ``gone``), or made before the cutoff."""
    remove: list[tuple[Path, str]] = []
    for state in _entries(cache, "states", used):
        backing = backing_file(state / "disk.qcow2")
        if everything:
            remove.append((state, "--all"))
        elif backing is None:
            remove.append((state, "incomplete: no disk layer"))
        elif not backing.exists() or any(backing.is_relative_to(image) for image in gone):
            remove.append((state, "its image is gone"))
        elif cutoff is not None and created_at(state) < cutoff:
            remove.append((state, f"made more than {older_than_days:g} days ago"))
    return remove


def _leftovers(cache: Cache) -> list[Candidate]:
    """What interrupted runs left in ``tmp`` (cache.entry names them <kind>--<key>-<random>)."""
    found: list[Candidate] = []
    for leftover in sorted((cache.root / "tmp").iterdir()) if (cache.root / "tmp").is_dir() else ():
        kind, sep, rest = leftover.name.partition("--")
        if sep:
            found.append(Candidate(leftover, f"{kind}-{rest.rsplit('-', 1)[0]}", "left by an interrupted run",
                                   tree_size(leftover)))
    return found


def _entries(cache: Cache, kind: str, used: set[Path]) -> list[Path]:
    directory = cache.root / kind
    return sorted(p for p in directory.iterdir() if p.is_dir() and p not in used) if directory.is_dir() else []


def created_at(entry: Path) -> float:
    """When the cache entry was made, from its manifest (its directory's time if that is unreadable)."""
    try:
        return float(json.loads((entry / "manifest.json").read_text(encoding="utf-8"))["created"])
    except (OSError, ValueError, KeyError, TypeError):
        return entry.stat().st_mtime


def remove(cache: Cache, candidates: list[Candidate]) -> Iterator[tuple[Candidate, bool]]:
    """Remove each candidate whose lock is free now; yields (candidate, removed)."""
    for candidate in candidates:
        with cache.try_lock(candidate.lock) as free:
            if free and os.path.lexists(candidate.path):
                remove_tree(candidate.path)
            yield candidate, free
