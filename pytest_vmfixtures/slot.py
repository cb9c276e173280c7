"""A slot of the pool: the guests of one (image, machine config), its saved state and its spares.

Spares are clean guests restored in the background while a test runs (``--vm-standby``; ``auto``: one, two
once the slot is hot). With ``auto``, a slot nothing has taken from for :data:`IDLE_AFTER` seconds while no
test holds one of its guests stops its ready spares and its idle guests: the run has moved on to other images
or configs, and each running guest holds its RAM and, under emulation, some CPU. Its next take restores again,
as the first one did.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Executor, Future
from typing import Protocol

from .backends.base import Backend, Machine, MachineConfig, SavedState
from .errors import VMError
from .guest import VM
from .images.cache import Cache
from .images.image import BuiltImage
from .instance import Instance, bind_channels, warm_up
from .restoring import StateRefused, close_if_made, restore_held
from .runtime import Runtime

log = logging.getLogger("pytest_vmfixtures")

STANDBY_AUTO = -1  # Pool(standby=): one spare per slot, two once it is hot (see Slot.spares_wanted)
HOT_AFTER = 3  # takes of a slot after which a second spare is kept: tests shorter than one spare's restore
IDLE_AFTER = 60.0  # s: an ``auto`` slot untouched this long, none of its guests held, stops its guests


class SlotOwner(Protocol):
    """What a slot needs of its pool."""

    @property
    def runtime(self) -> Runtime: ...
    @property
    def cache(self) -> Cache: ...
    @property
    def backend(self) -> Backend: ...
    @property
    def executor(self) -> Executor: ...
    @property
    def standby(self) -> int: ...
    def snapshotted_instance(self, image: BuiltImage, config: MachineConfig) -> Instance: ...
    def saved_state(self, image: BuiltImage, config: MachineConfig) -> SavedState: ...


def bound_instance(machine: Machine, image: BuiltImage, facts: Mapping[str, object] | None = None) -> Instance:
    """The machine with its channels (stopped if they cannot be made). ``facts``: what the state's first boot
    found (``agent`` False: commands over SSH from the start; ``root_login`` True: SSH as root, no sudo)."""
    facts = facts or {}
    try:
        return bind_channels(machine, image, facts.get("agent") is not False, facts.get("root_login") is True, facts.get("runner") is True)
    except BaseException:
        machine.stop()
        raise


class Slot:
    """Guests of one (image, config), their saved state and their spares.

    ``state`` None: the backend has no saved states; each instance is a guest booted with its own snapshot.
    """

    def __init__(self, pool: SlotOwner, image: BuiltImage, config: MachineConfig, state: SavedState | None) -> None:
        self.pool = pool
        self.image = image
        self.config = config
        self.state = state
        self.idle: list[VM] = []  # clean guests no test holds, kept for the next
        self.busy: set[VM] = set()  # guests tests hold
        self._spares: list[Future[Instance]] = []  # oldest first; up to spares_wanted()
        self._taken = 0
        self._last_take = time.monotonic()
        self._lock = threading.Lock()
        self._remake_lock = threading.Lock()
        self._closed = False

    def new_instance(self) -> Instance:
        if self.state is None:
            return self.pool.snapshotted_instance(self.image, self.config)
        name = self.pool.runtime.new_name(self.config.label)
        state = self.state
        backend = self.pool.backend
        try:
            machine = restore_held(self.pool.cache, backend, self.image, self.config, state, name)
        except StateRefused as refused:  # QEMU refuses it (the key missed something), or it is gone: make it again
            log.warning("saved state %s does not load (%s); making it again", state.key, refused.error)
            self.remake_state(state, refused.generation)
            assert self.state is not None
            state = self.state
            machine = restore_held(self.pool.cache, backend, self.image, self.config, state, name)
        instance = bound_instance(machine, self.image, state.meta)
        try:
            warm_up(instance, self.image)
        except BaseException:
            instance.close()
            raise
        return instance

    def take_instance(self) -> Instance:
        """A clean instance: the oldest spare if one is coming (a ready one if any is), else restored now."""
        with self._lock:
            ready = [f for f in self._spares if f.done()]
            spare = (ready or self._spares)[0] if self._spares else None
            if spare is not None:
                self._spares.remove(spare)
            self._taken += 1
            self._last_take = time.monotonic()
        instance: Instance | None = None
        if spare is not None:
            try:
                instance = spare.result(timeout=300)
            except Exception as exc:
                log.warning("spare %s guest failed (%s); restoring one now", self.config.image, exc)
                spare.add_done_callback(close_if_made)  # given up on: if it comes after all, it is stopped
        if instance is None:
            instance = self.new_instance()
        self.refill()
        return instance

    # -- the guests tests hold and the idle ones ----------------------------------
    def pop_idle(self) -> VM | None:
        """An idle clean guest for a test, if one is kept."""
        with self._lock:
            self._last_take = time.monotonic()
            return self.idle.pop() if self.idle else None

    def hold(self, vm: VM) -> None:
        with self._lock:
            self.busy.add(vm)

    def let_go(self, vm: VM) -> None:
        with self._lock:
            self.busy.discard(vm)

    def park(self, vm: VM) -> bool:
        """Keep a reverted guest for the next test; False if the slot is closed (the caller stops it)."""
        with self._lock:
            if self._closed:
                return False
            self.idle.append(vm)
            return True

    def remake_state(self, broken: SavedState, generation: str | None) -> None:
        """Discard a state that failed if it is still the ``generation`` that failed (else another worker made
        it again: use that one), and make it anew, once more if that fails once."""
        with self._remake_lock:
            if self.state is not broken:
                return  # another thread already made a new one
            self.pool.cache.discard(broken.directory, generation)
            try:
                self.state = self.pool.saved_state(self.image, self.config)
            except VMError as exc:
                log.warning("making saved state %s again failed (%s); trying once more", broken.key, exc)
                self.state = self.pool.saved_state(self.image, self.config)

    def wait_for_spares(self, timeout: float = 300.0) -> None:
        """Wait until the spares being restored are ready (or failed): as after a test that ran a while."""
        with self._lock:
            spares = list(self._spares)
        for spare in spares:
            with contextlib.suppress(Exception):
                spare.result(timeout)

    def spares_wanted(self) -> int:
        """Clean instances to keep restoring ahead: ``--vm-standby``, or for ``auto`` one, and two once the slot
        is hot (short tests outpace one spare's restore and warm-up: revert p50 0.35 -> 0.18 s, benchmarks/)."""
        if self.pool.standby != STANDBY_AUTO:
            return self.pool.standby
        return 2 if self._taken >= HOT_AFTER else 1

    def refill(self) -> None:
        if self.state is None:  # no saved state (a hypervisor snapshot per guest): no spare, each guest is its own
            return
        with self._lock:
            while not self._closed and len(self._spares) < self.spares_wanted():
                self._spares.append(self.pool.executor.submit(self.new_instance))

    def shed_if_idle(self, now: float) -> int:
        """``auto`` standby: stop the ready spares and idle guests of a slot nothing took from for
        :data:`IDLE_AFTER` s while no test held one of its guests; how many were stopped. Spares still being
        restored are left to a later call. The slot is cold again: its next take restores, then refills."""
        with self._lock:
            if self.pool.standby != STANDBY_AUTO or self._closed or self.busy or now - self._last_take < IDLE_AFTER:
                return 0
            spares = [f for f in self._spares if f.done()]
            self._spares = [f for f in self._spares if not f.done()]
            idle, self.idle = self.idle, []
            self._taken = 0
        for spare in spares:
            close_if_made(spare)
        for vm in idle:
            vm.kill()
        if spares or idle:
            log.debug("%s: not used for %.0f s; stopped %d guests", self.config.describe(), now - self._last_take,
                      len(spares) + len(idle))
        return len(spares) + len(idle)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            spares, self._spares = self._spares, []
            guests = [*self.idle, *self.busy]
            self.idle, self.busy = [], set()
        for spare in spares:
            with contextlib.suppress(Exception):
                spare.result(timeout=300).close()
        for vm in guests:
            with contextlib.suppress(Exception):
                vm.kill()
