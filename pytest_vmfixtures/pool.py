"""The session's owner of guests: which exist, who holds them, how they end.

Per (image, machine config) the pool keeps a *slot*: the saved ready state
(made once by booting and provisioning, then kept in the cache), the idle
guests, and *spares* (``--vm-standby``; ``auto``: one, two once the slot is hot) restored in the
background while a test runs. Reverting a guest to clean is then a swap: the used instance is killed,
the spare takes its place, and a new spare starts restoring.

A backend without "saved_state" (libvirt's snapshot mode) gets slots with no state and no spare: each
guest boots, is provisioned and snapshotted itself (``take_clean``), and is reverted in place (``revert_clean``).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .accel import accel_of_guest
from .backends.base import (
    STATE_CONSOLE,
    Backend,
    MachineConfig,
    SavedState,
    SnapshotReverting,
    capabilities_of,
    config_inputs,
    digest_of,
)
from .changes import BASELINE_DIGEST, take_baseline
from .command import DEFAULT_COMMAND_TIMEOUT
from .errors import GuestError, SnapshotError, VMError
from .guest import VM, GuestState, read_guest_os
from .images import qcow2
from .images.byo import DEFAULT_USER, ByoSpec, is_byo
from .images.byo import prepare as prepare_byo
from .images.cache import Cache, ensure_image
from .images.image import BuiltImage
from .instance import Instance, login_prompts, named_snapshot_calls, retarget, settle_first_boot, wait_ssh_ready, warm_up
from .runtime import Runtime
from .slot import STANDBY_AUTO, Slot, bound_instance

log = logging.getLogger("pytest_vmfixtures")

STATE_FORMAT = 3  # 3: the boot's console log is kept with the state
SHED_EVERY = 10.0  # s: how often idle slots are looked at (Slot.shed_if_idle)
Progress = Callable[[str], None]


class Pool:
    def __init__(
        self,
        backend: Backend,
        cache: Cache,
        runtime: Runtime,
        image_dirs: Sequence[Path],
        *,
        accel: str,
        boot_timeout: float = 600.0,
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
        standby: int = STANDBY_AUTO,
        provision: Callable[[VM], None] = lambda vm: None,
        provision_key: str = "",
        ready: Callable[[VM], None] = lambda vm: None,
        progress: Progress = lambda message: None,
        resolve: Callable[[str], BuiltImage | None] = lambda name: None,
        changes_ignore: tuple[str, ...] = (),
    ) -> None:
        self.backend = backend
        self.cache = cache
        self.runtime = runtime
        self.image_dirs = list(image_dirs)
        self.accel = accel
        self.boot_timeout = boot_timeout
        self.command_timeout = command_timeout
        self.standby = standby
        self.provision = provision
        self.provision_key = provision_key
        self.ready = ready
        self.progress = progress
        self.resolve = resolve
        self.changes_ignore = changes_ignore
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="vmfixtures-pool")
        self._slots: dict[MachineConfig, Slot] = {}
        self._images: dict[str, BuiltImage] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._stopping = threading.Event()
        if standby == STANDBY_AUTO:  # a count given is kept however long a slot is idle: nothing to shed
            threading.Thread(target=self._shed_idle, name="vmfixtures-shed", daemon=True).start()
        self.kept: list[tuple[VM, str]] = []
        self.channels: dict[str, str] = {}  # image label -> the channel its first guest got (the run's summary says it)

    # -- images and states ----------------------------------------------------
    def image(self, name: str, config: MachineConfig | None = None) -> BuiltImage:
        """The image ``name`` names: a hook's, the user's own file or URL (see byo.py), or a recipe's."""
        byo = is_byo(name) and config is not None
        key = f"{name}|{config.sha256}|{config.user}|{config.firmware}" if byo and config is not None else name
        if key in self._images:
            return self._images[key]
        provided = self.resolve(name)
        if provided is not None:
            self._images[key] = provided
            return provided
        if byo and config is not None:
            spec = ByoSpec(name, config.sha256, config.user or DEFAULT_USER, config.firmware or "auto")
            image = prepare_byo(self.cache, spec, self.progress)
        else:
            image = ensure_image(self.cache, name, self.image_dirs, self.progress)
        self.runtime.record_use(*(p for p in (image.directory, image.disk, image.seed, image.client_key) if p is not None))
        self._images[key] = image
        return image

    def state_key(self, image: BuiltImage, config: MachineConfig) -> str:
        inputs = {
            "format": STATE_FORMAT,
            "image": image.disk_sha256,
            "config": config_inputs(config),
            "backend": self.backend.state_inputs(image, config),
            "provision": self.provision_key,
            "changes": BASELINE_DIGEST,  # the state's RAM holds vm.changes()' baseline: a new script, new states
        }
        if image.seed is not None:  # the seed carries the guest's keys: new keys, new state
            inputs["seed"] = image.recipe_digest
        return f"{config.label}-{digest_of(inputs)[:16]}"

    def saved_state(self, image: BuiltImage, config: MachineConfig) -> SavedState:
        key = self.state_key(image, config)

        def create(directory: Path) -> None:
            facts = self._make_state(image, config, directory)
            files = sorted(p.name for p in directory.iterdir() if p.is_file())  # the backend's, and the console
            self.cache.write_manifest(directory, {"kind": "state", "config": config_inputs(config), **facts}, files)

        def verify(directory: Path) -> str | None:
            # A state whose disk layer sits on another file than the image's disk (a cache moved since) is made anew.
            backing = qcow2.backing_file(directory / "disk.qcow2")
            if backing is not None and not (backing.exists() and os.path.samefile(backing, image.disk)):
                return f"its disk layer sits on {backing}, not on {image.disk}"
            return self.cache.check_entry(directory)

        directory = self.cache.entry(
            "states", key, create, verify,
            waiting=lambda: self.progress(f"waiting for another run preparing {config.describe()}"),
        )
        self.runtime.record_use(directory)
        return SavedState(directory, directory / "disk.qcow2", directory / "memory", key, self.cache.read_manifest(directory))

    def accel_for(self, image: BuiltImage) -> str:
        return accel_of_guest(self.accel, image.arch)

    def _make_state(self, image: BuiltImage, config: MachineConfig, directory: Path) -> dict[str, object]:
        """Cold boot, provision, and freeze: done once per state key, ever. Returns what was learned."""
        started = time.monotonic()
        self.progress(f"booting {config.describe()} with accel {self.accel_for(image)} (first use; warm starts afterwards)")
        instance, facts = self._boot_provisioned(image, config, self.runtime.new_name(f"{config.label}-boot"), started)
        machine = instance.machine
        try:
            self.backend.save(machine, directory)
            # Restored guests' console logs start with this boot (see backends.base.start_restored_console).
            if machine.console_log.exists():
                shutil.copyfile(machine.console_log, directory / STATE_CONSOLE)
                os.chmod(directory / STATE_CONSOLE, 0o600)
        finally:
            instance.close()
        self.progress(f"saved ready state of {config.describe()} ({time.monotonic() - started:.0f} s in all)")
        return facts

    def _boot_provisioned(self, image: BuiltImage, config: MachineConfig, name: str, started: float) -> tuple[Instance, dict[str, object]]:
        """A cold-booted, provisioned guest (page cache dropped, channels closed) and what its first boot found."""
        facts: dict[str, object] = {}
        accel = self.accel_for(image)
        machine = self.backend.boot(image, config, name)
        instance = bound_instance(machine, image)
        try:
            wait_ssh_ready(instance, self.boot_timeout, accel)
            self.progress(f"{config.label} booted in {time.monotonic() - started:.0f} s; provisioning")
            vm = self._handle(image, config, instance, slot=None)
            vm.state = GuestState.DIRTY
            if image.seed is not None:
                facts.update(settle_first_boot(instance, image, self.boot_timeout, accel))
                self.progress(f"{config.label}: commands go through " + {"agent": "the guest agent", "runner": "vmfx-runner"}.get(
                    instance.channel, "SSH" + (" as root" if facts["root_login"] else ", with sudo")))
            self.provision(vm)
            facts.update(take_baseline(lambda script, timeout: vm.run(script, timeout=timeout), config.label, self.progress))
            # Fewer RAM pages to save: drop file contents; the dentry and inode caches the baseline filled stay.
            vm.run(login_prompts(image) + "sync; echo 1 > /proc/sys/vm/drop_caches", timeout=120)
            instance.close_channels()
        except BaseException:
            instance.close()
            raise
        return instance, facts

    def snapshotted_instance(self, image: BuiltImage, config: MachineConfig) -> Instance:
        """A backend without saved states: a guest of its own, booted, provisioned and snapshotted as clean."""
        started = time.monotonic()
        self.progress(f"booting {config.describe()} with accel {self.accel_for(image)} "
                      "(no saved states here: each guest boots once and keeps a snapshot)")
        instance, _facts = self._boot_provisioned(image, config, self.runtime.new_name(config.label), started)
        try:
            self._snapshots().take_clean(instance.machine)
        except BaseException:
            instance.close()
            raise
        self.progress(f"{config.label}: clean snapshot taken ({time.monotonic() - started:.0f} s in all)")
        return instance

    def _snapshots(self) -> SnapshotReverting:
        if not isinstance(self.backend, SnapshotReverting):
            raise GuestError(f"backend {self.backend.name} has no saved states and no snapshots to revert guests with")
        return self.backend

    def revert_in_place(self, instance: Instance, image: BuiltImage) -> None:
        """Put a guest back into its clean snapshot (backends without saved states), channels fresh."""
        instance.close_channels()
        self._snapshots().revert_clean(instance.machine)
        retarget(instance)
        warm_up(instance, image)

    # -- guests ----------------------------------------------------------------
    def _slot(self, config: MachineConfig) -> Slot:
        with self._lock:
            slot = self._slots.get(config)
        if slot is not None:
            return slot
        image = self.image(config.image, config)
        state = self.saved_state(image, config) if "saved_state" in capabilities_of(self.backend) else None
        with self._lock:
            slot = self._slots.setdefault(config, Slot(self, image, config, state))
        return slot

    def _handle(self, image: BuiltImage, config: MachineConfig, instance: Instance, slot: Slot | None) -> VM:
        def fresh() -> Instance:
            if slot is None:
                raise SnapshotError("a guest being provisioned cannot be reverted to clean: it has no clean state yet")
            return slot.take_instance()

        in_place = slot is not None and slot.state is None  # no saved state: the guest's own snapshot
        return VM(
            name=instance.machine.name,
            image=image,
            config=config,
            accel=self.accel_for(image),
            instance=instance,
            fresh_instance=fresh,
            discard=self.discard,
            guest_os=read_guest_os,
            boot_timeout=self.boot_timeout,
            command_timeout=self.command_timeout,
            capabilities=capabilities_of(self.backend),
            revert_in_place=(lambda instance: self.revert_in_place(instance, image)) if in_place else None,
            named_snapshots=named_snapshot_calls(self._snapshots()) if in_place else None,
            changes_ignore=self.changes_ignore,
        )

    def acquire(self, config: MachineConfig) -> VM:
        if self._closed:
            raise GuestError("the guest pool is closed (the session is ending)")
        slot = self._slot(config)
        vm = slot.pop_idle()
        if vm is None:
            vm = self._handle(slot.image, config, slot.take_instance(), slot)
            try:
                self.ready(vm)
            except BaseException:  # a pytest_vm_ready hook that raised: the guest is nobody's, stop it
                vm.kill()
                raise
            vm.state = GuestState.READY
        slot.hold(vm)
        with self._lock:
            self.channels.setdefault(config.label, vm.channel)
        return vm

    def release(self, vm: VM) -> None:
        """Revert ``vm`` to clean and keep it for the next test; a guest that cannot be reverted is dropped."""
        slot = self._slots.get(vm.config)
        if slot is None:
            vm.kill()
            return
        slot.let_go(vm)
        if vm.state == GuestState.DEAD:  # it died during the test; the next test gets a new guest
            vm.kill()
            return
        try:
            vm.reset()
        except VMError as exc:
            log.warning("reverting %s failed (%s); discarding it", vm.name, exc)
            vm.kill()
            raise
        if self._closed or not slot.park(vm):
            vm.kill()

    def keep(self, vm: VM, reason: str) -> None:
        """Leave a failed test's guest running for a person to inspect; it is not reused."""
        slot = self._slots.get(vm.config)
        if slot is not None:
            slot.let_go(vm)
        self.backend.keep(vm._instance.machine)
        self.kept.append((vm, reason))

    def discard(self, instance: Instance) -> None:
        """Stop an instance off the test's critical path."""
        if self._closed:
            instance.close()
            return
        self.executor.submit(instance.close)

    def _shed_idle(self) -> None:
        """In the background: slots the run has left stop their guests (see Slot.shed_if_idle)."""
        while not self._stopping.wait(SHED_EVERY):
            with self._lock:
                slots = list(self._slots.values())
            for slot in slots:
                try:
                    slot.shed_if_idle(time.monotonic())
                except Exception as exc:  # a guest that does not stop cleanly: the session's end stops it
                    log.warning("stopping idle guests of %s failed: %s", slot.config.describe(), exc)

    def close(self) -> None:
        """Stop everything; every step runs even if one fails."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        for slot in list(self._slots.values()):
            try:
                slot.close()
            except Exception as exc:
                log.warning("closing guests of %s failed: %s", slot.config.describe(), exc)
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.backend.close()
