"""Restoring a saved state from the shared cache: under its lock, and what a failed restore proves.

A restore holds the state's cache entry shared while the backend opens its files, so no worker, run or
``images prune`` removes it meanwhile. A SnapshotError then names the making of the state that failed
(its generation), so that only that making is discarded (``Cache.discard``), never one another worker
made since.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future

from .backends.base import Backend, Machine, MachineConfig, SavedState
from .errors import SnapshotError
from .images.cache import Cache
from .images.image import BuiltImage
from .instance import Instance


class StateRefused(SnapshotError):
    """A restore failed on the saved state itself; ``generation``: the making that failed (None: it was gone)."""

    def __init__(self, error: SnapshotError, generation: str | None) -> None:
        super().__init__(str(error))
        self.error = error
        self.generation = generation


def restore_held(cache: Cache, backend: Backend, image: BuiltImage, config: MachineConfig, state: SavedState,
                 name: str) -> Machine:
    """``backend.restore`` of ``state`` holding its cache entry shared; StateRefused if the state is at fault."""
    with cache.reading(state.directory) as generation:
        if generation is None:
            raise StateRefused(SnapshotError(f"saved state {state.key} is gone from the cache"), None)
        try:
            return backend.restore(image, config, state, name)
        except SnapshotError as exc:
            raise StateRefused(exc, generation) from exc


def close_if_made(spare: Future[Instance]) -> None:
    """Stop the instance a spare that was given up on made after all (nobody else holds it)."""
    if not spare.cancelled() and spare.exception() is None:
        with contextlib.suppress(Exception):
            spare.result().close()
