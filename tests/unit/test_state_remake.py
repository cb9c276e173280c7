"""A saved state that fails is made again once, by one worker, and never removed under another (finding M1).

Several slots (each with its own Cache object, as xdist workers and separate runs have) share one cache
directory. The backend is a FAKE (this is about the pool and the cache, not QEMU): its restore refuses
the first making of the state, as QEMU refuses a state the key did not capture, and fails the way the real
ones do when the state's files are gone under it. tests/integration/test_shared_cache_remake.py does the
same with real guests and real pytest runs.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from pytest_vmfixtures import slot as slot_module
from pytest_vmfixtures.backends.base import MachineConfig, SavedState
from pytest_vmfixtures.errors import BootError, SnapshotError
from pytest_vmfixtures.images.cache import Cache
from pytest_vmfixtures.slot import Slot

WORKERS = 4
KEY = "tiny-0123456789abcdef"


class Maker:
    """Makes the state entry (counting how often) as Pool.saved_state does; can fail its next makings."""

    def __init__(self) -> None:
        self.made = 0
        self.fail_next = 0
        self.lock = threading.Lock()

    def saved_state(self, cache: Cache) -> SavedState:
        def create(directory: Path) -> None:
            with self.lock:
                if self.fail_next:
                    self.fail_next -= 1
                    raise BootError("the cold boot failed (once)")
                self.made += 1
                generation = self.made
            for name in ("disk.qcow2", "memory"):
                (directory / name).write_bytes(f"{name} {generation}".encode())
            cache.write_manifest(directory, {"kind": "state", "generation": generation}, ["disk.qcow2", "memory"])

        directory = cache.entry("states", KEY, create, cache.check_manifest)
        return SavedState(directory, directory / "disk.qcow2", directory / "memory", KEY, cache.read_manifest(directory))


class FakeBackend:
    """Refuses the first making of the state; reads the state's files as a restore does."""

    def __init__(self, workers: int) -> None:
        self.together = threading.Barrier(workers, timeout=60)
        self.errors: list[BaseException] = []

    def restore(self, image: object, config: object, state: SavedState, name: str) -> str:
        try:
            memory = state.memory.read_bytes()  # FileNotFoundError if removed under us, as QEMU's open would
            generation = json.loads((state.directory / "manifest.json").read_text())["generation"]
        except BaseException as exc:
            self.errors.append(exc)
            raise
        if generation == 1:
            self.together.wait()  # every worker has the first making in hand at once
            raise SnapshotError("QEMU refuses the state (FAKE)")
        return f"{name} from {memory.decode()}"


@pytest.fixture(autouse=True)
def no_channels(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(slot_module, "bound_instance", lambda machine, image, facts=None: machine)
    monkeypatch.setattr(slot_module, "warm_up", lambda instance, image: None)
    yield


def slots(root: Path, maker: Maker, backend: FakeBackend, n: int) -> list[Slot]:
    Cache(root).ensure_writable()
    made = []
    for worker in range(n):
        cache = Cache(root)
        counter = iter(range(1, 1000))
        pool = SimpleNamespace(
            cache=cache, backend=backend,
            runtime=SimpleNamespace(new_name=lambda label, w=worker, c=counter: f"gw{w}-{label}-{next(c)}"),
            saved_state=lambda image, config, c=cache: maker.saved_state(c),
        )
        made.append(Slot(pool, None, MachineConfig("tiny"), maker.saved_state(cache)))  # type: ignore[arg-type]
    return made


def test_workers_that_all_see_a_bad_state_make_it_again_once(tmp_path: Path) -> None:
    maker, backend = Maker(), FakeBackend(WORKERS)
    workers = slots(tmp_path, maker, backend, WORKERS)
    results: list[object] = []

    def take(slot: Slot) -> None:
        try:
            results.append(slot.new_instance())
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=take, args=(slot,)) for slot in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [r for r in results if not isinstance(r, str)] == []
    assert all(str(r).endswith("memory 2") for r in results), results
    assert maker.made == 2  # the first making, and one remake for all four workers
    assert backend.errors == []  # nobody's state was removed while it read it


def test_a_remake_that_fails_once_is_tried_again(tmp_path: Path) -> None:
    maker, backend = Maker(), FakeBackend(1)
    (slot,) = slots(tmp_path, maker, backend, 1)
    maker.fail_next = 1
    assert str(slot.new_instance()).endswith("memory 2")
    assert maker.made == 2


def test_a_state_gone_from_the_cache_is_made_again_not_an_error(tmp_path: Path) -> None:
    """Pruned (or removed by hand) after the slot looked it up: a SnapshotError's remake, not a raw OSError."""
    maker, backend = Maker(), FakeBackend(1)
    (slot,) = slots(tmp_path, maker, backend, 1)
    maker.made = 1  # the next making is the second: one this backend restores
    assert slot.state is not None
    for name in ("disk.qcow2", "memory", "manifest.json"):
        (slot.state.directory / name).chmod(0o600)
        (slot.state.directory / name).unlink()
    assert str(slot.new_instance()).endswith("memory 2")
    assert backend.errors == []
