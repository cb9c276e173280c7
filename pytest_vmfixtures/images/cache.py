"""The cache: built images and saved ready states, content-addressed and shared.

Entries are directories named by a digest of everything that made them. They
appear atomically (built in ``tmp/``, renamed into place, metadata written
last), are read-only once made, and are verified by digest before a process
first uses them, so a truncated or bit-flipped file is rebuilt, not used. A digest found
right is recorded in the entry's stamp (``.verified.json``) with the file's identity
(device, inode, size, modification and change times); while a file keeps that identity
its digest is not computed again. Any write, truncation, replacement or mode change moves
the change time, which no user can set back, so such a file is read and checked again.
Concurrent pytest processes and xdist workers build each entry once: the
first takes a file lock, the others wait on it and then find the entry.
Readers hold the same lock shared while they open an entry's files
(``reading``), so an entry is never removed under them; and an entry found
unusable is removed only if it is still the generation that failed
(``discard``), so N workers that saw one bad state make one new state, not N.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ..errors import ImageError
from .image import BuiltImage

log = logging.getLogger("pytest_vmfixtures")

LOCK_TIMEOUT = 3600.0
STAMP = ".verified.json"  # in an entry: each file's digest found right, by the file's identity then


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pytest-vmfixtures"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def file_identity(path: Path) -> list[int]:
    """What changes whenever a file's bytes may have: device, inode, size, mtime and ctime (ns)."""
    info = os.stat(path, follow_symlinks=False)
    return [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]


def make_read_only(path: Path) -> None:
    mode = path.stat().st_mode
    path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def remove_tree(path: Path) -> None:
    """Remove a cache entry, read-only files and all; a symlink in its place is removed, never followed."""
    if path.is_symlink():
        path.unlink()
        return
    if not path.exists():
        return
    for p in [path, *path.rglob("*")]:
        with contextlib.suppress(OSError):
            if not p.is_symlink():
                p.chmod(p.stat().st_mode | stat.S_IWUSR | (stat.S_IXUSR if p.is_dir() else 0))
    shutil.rmtree(path, ignore_errors=True)


class Cache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._verified: set[Path] = set()

    def ensure_writable(self) -> None:
        """Fail early, with the fix, when the cache cannot be used."""
        try:
            for sub in ("images", "states", "locks", "tmp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            probe = self.root / "tmp" / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ImageError(
                f"cache dir {self.root} is not writable ({exc.strerror}); pass --vm-cache=DIR or fix its permissions"
            ) from exc

    @property
    def images(self) -> Path:
        return self.root / "images"

    @contextlib.contextmanager
    def lock(
        self, key: str, timeout: float = LOCK_TIMEOUT, waiting: Callable[[], None] | None = None, shared: bool = False,
    ) -> Iterator[None]:
        """An exclusive (or ``shared``) lock seen by every process using this cache (flock: released if we die)."""
        path = self.root / "locks" / f"{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            deadline = time.monotonic() + timeout
            told = False
            while True:
                try:
                    fcntl.flock(f, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not told and waiting is not None:
                        waiting()
                        told = True
                    if time.monotonic() > deadline:
                        raise ImageError(f"waited {timeout:g} s for cache lock {path}; is another run stuck?") from None
                    time.sleep(0.2)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def try_lock(self, key: str) -> Iterator[bool]:
        """The lock ``key`` if it is free right now (True), else False at once.

        For cleanup, which must neither wait for a build nor remove what one
        is making or checking.
        """
        path = self.root / "locks" / f"{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def new_tmp(self, label: str) -> Path:
        path = self.root / "tmp" / f"{label}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True, mode=0o700)
        return path

    def entry(
        self,
        kind: str,
        key: str,
        create: Callable[[Path], None],
        verify: Callable[[Path], str | None],
        waiting: Callable[[], None] | None = None,
    ) -> Path:
        """Return the directory for ``kind/key``, creating it once across processes.

        ``create`` fills an empty temp dir; ``verify`` returns None when an
        entry is intact or a reason when it is not (it is then removed and
        made again).
        """
        final = self.root / kind / key
        if final in self._verified and final.exists():
            return final
        with self.lock(f"{kind}-{key}", waiting=waiting):
            if final.exists():
                problem = verify(final)
                if problem is None:
                    self._verified.add(final)
                    return final
                log.warning("cache entry %s is damaged (%s); making it again", final, problem)
                remove_tree(final)
            tmp = self.new_tmp(f"{kind}--{key}")
            try:
                create(tmp)
                problem = verify(tmp)
                if problem is not None:
                    raise ImageError(f"new cache entry {key} failed its own check: {problem}")
                os.rename(tmp, final)
            except BaseException:
                remove_tree(tmp)
                raise
            self._verified.add(final)
            return final

    @staticmethod
    def generation(directory: Path) -> str | None:
        """Which making of the entry ``directory`` is there now (None: none, or an incomplete one).

        The directory's inode and its manifest's time: a remade entry differs in both.
        """
        try:
            inode = os.stat(directory).st_ino
            created = json.loads((directory / "manifest.json").read_text())["created"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return f"{inode}-{created!r}"

    @contextlib.contextmanager
    def reading(self, directory: Path) -> Iterator[str | None]:
        """Hold the entry ``directory`` shared while its files are opened: nobody removes it meanwhile.

        Yields its generation (None: it is gone, removed as unusable or pruned since it was looked up).
        """
        with self.lock(f"{directory.parent.name}-{directory.name}", shared=True):
            yield self.generation(directory)

    def discard(self, directory: Path, generation: str | None) -> bool:
        """Remove an entry found unusable, if it is still the ``generation`` that failed (under its lock, so
        no reader has it removed under them). False: it is gone or was made again since; keep what is there."""
        kind, key = directory.parent.name, directory.name
        self._verified.discard(directory)  # whatever is there next is checked before it is used
        with self.lock(f"{kind}-{key}"):
            if generation is None or self.generation(directory) != generation:
                return False
            remove_tree(directory)
            return True

    def write_manifest(self, directory: Path, meta: dict[str, object], files: list[str]) -> None:
        """Record digests of ``files`` and make them read-only; written last, so its presence means complete."""
        digests = {name: sha256_file(directory / name) for name in files}
        meta = dict(meta, files=digests, created=time.time())
        for name in files:
            make_read_only(directory / name)
        _write_stamp(directory, {name: [digest, *file_identity(directory / name)] for name, digest in digests.items()})
        tmp = directory / ".manifest.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
        os.replace(tmp, directory / "manifest.json")

    @staticmethod
    def check_manifest(directory: Path) -> str | None:
        """Why the entry is not as its manifest says (None: every file read and found right); no stamp trusted."""
        return _verify(directory, {})[0]

    @staticmethod
    def check_entry(directory: Path) -> str | None:
        """:meth:`check_manifest`, computing only the digests of files not known intact by their identity.

        A file whose identity is the one the entry's stamp recorded beside the manifest's digest is the file
        found intact then; every other file is read and checked, and the stamp records it once it passes.
        Called under the entry's exclusive lock (``entry``), so one process writes the stamp at a time.
        """
        stamp = _read_stamp(directory)
        problem, checked = _verify(directory, stamp)
        if problem is None and checked != stamp:
            _write_stamp(directory, checked)
        return problem

    @staticmethod
    def read_manifest(directory: Path) -> dict[str, object]:
        data: dict[str, object] = json.loads((directory / "manifest.json").read_text())
        return data

    def clean_tmp(self) -> list[str]:
        """Remove half-made entries of runs that died: nobody holds their lock any more."""
        tmp = self.root / "tmp"
        removed: list[str] = []
        if not tmp.is_dir():
            return removed
        for entry in tmp.iterdir():
            kind, sep, rest = entry.name.partition("--")
            if not sep:
                continue
            key = rest.rsplit("-", 1)[0]
            try:
                with self.try_lock(f"{kind}-{key}") as free:
                    if not free:
                        continue  # being built right now
                    remove_tree(entry)
                    removed.append(entry.name)
            except OSError:
                continue
        return removed


def _verify(directory: Path, known: dict[str, object]) -> tuple[str | None, dict[str, list[object]]]:
    """Check the entry's files against its manifest, reading only those whose ``[digest, *identity]`` is not
    in ``known``: why it is not intact (None if it is), and each file's ``[digest, *identity]`` as found."""
    try:
        meta = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return "manifest missing or unreadable", {}
    checked: dict[str, list[object]] = {}
    for name, digest in meta.get("files", {}).items():
        path = directory / name
        try:
            identity = file_identity(path)  # before reading: a change while it is read moves it
            if known.get(name) != [digest, *identity] and sha256_file(path) != digest:
                return f"{name} does not match its digest", checked
        except OSError:
            return f"{name} missing", checked
        checked[name] = [digest, *identity]
    return None, checked


def _read_stamp(directory: Path) -> dict[str, object]:
    try:
        stamp = json.loads((directory / STAMP).read_text())
    except (OSError, ValueError):
        return {}
    return stamp if isinstance(stamp, dict) else {}


def _write_stamp(directory: Path, stamp: dict[str, list[object]]) -> None:
    """Replace the entry's stamp at once; a cache that cannot be written to keeps checking digests."""
    tmp = directory / f"{STAMP}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        tmp.write_text(json.dumps(stamp, sort_keys=True))
        os.chmod(tmp, 0o600)
        os.replace(tmp, directory / STAMP)
    except OSError as exc:
        log.debug("cannot write the stamp of %s (%s); its digests are checked again next time", directory, exc)
        with contextlib.suppress(OSError):
            tmp.unlink()


def image_key(name: str, recipe_digest: str) -> str:
    return f"{name}-{recipe_digest[:16]}"


def ensure_image(cache: Cache, name: str, image_dirs: Sequence[Path], progress: Callable[[str], None]) -> BuiltImage:
    """The built image for recipe ``name``: from the cache, or built now (once across processes)."""
    from .builder import build_image
    from .catalog import load_recipe

    recipe = load_recipe(name, image_dirs)

    def create(directory: Path) -> None:
        started = time.monotonic()
        progress(f"building image {name} (first use; cached afterwards)")
        build_image(recipe, directory, progress)
        image = BuiltImage.load(directory)
        cache.write_manifest(
            directory,
            {"kind": "image", "name": name, "recipe_digest": recipe.digest},
            [p.name for p in (image.disk, image.kernel, image.initrd) if p is not None],
        )
        progress(f"built image {name} in {time.monotonic() - started:.0f} s")

    directory = cache.entry(
        "images",
        image_key(recipe.name, recipe.digest),
        create,
        cache.check_entry,
        waiting=lambda: progress(f"waiting for another run building image {name}"),
    )
    return BuiltImage.load(directory)
