"""The fixtures tests use: ``vm`` and ``vm_factory``.

Thin, function-scoped: the session's pool boots and keeps the guests; a
fixture hands one out and gives it back at teardown, where it is reverted to
its clean state whether the test passed or failed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

from .backends.base import MachineConfig, capabilities_of
from .errors import VMError
from .evidence import Evidence, artifact_dir, collect
from .guest import VM
from .network import Network
from .options import DEFAULT_IMAGE, MarkerSpec, OptionError, parse_marker
from .session import VMSession

log = logging.getLogger("pytest_vmfixtures")

SESSION_KEY = pytest.StashKey[VMSession]()
HELD_KEY = pytest.StashKey[list[VM]]()
FAILED_KEY = pytest.StashKey[bool]()
EVIDENCE_KEY = pytest.StashKey[list[Evidence]]()  # what a failed test's guests left, for the teardown report


def marker_spec(item: pytest.Item | Any) -> MarkerSpec:
    node = item
    where = getattr(node, "nodeid", "?")
    marks = [(m.args, m.kwargs) for m in node.iter_markers("vm")]
    try:
        return parse_marker(where, marks)
    except OptionError as exc:
        raise pytest.UsageError(str(exc)) from None


def _session(request: pytest.FixtureRequest) -> VMSession:
    return request.config.stash[SESSION_KEY]


def _require_capabilities(request: pytest.FixtureRequest, spec: MarkerSpec) -> None:
    """Skip the test, saying why, if this run's hypervisor lacks what its marker's ``needs=`` names."""
    if not spec.needs:
        return
    backend = _session(request).pool.backend
    missing = sorted(spec.needs - capabilities_of(backend))
    if missing:
        pytest.skip(f"needs {', '.join(missing)}, which this run's hypervisor ({backend.name}: {backend.describe()}) does not offer")


def _give_back(session: VMSession, vm: VM, node: pytest.Item) -> None:
    if node.stash.get(FAILED_KEY, False):
        try:
            evidence = collect(vm, artifact_dir(session.artifacts_root(), node.nodeid, vm.name))
            node.stash.setdefault(EVIDENCE_KEY, []).append(evidence)
            session.artifacts_written |= bool(evidence.files)
        except Exception as exc:  # evidence is best effort; reverting must still happen
            log.warning("collecting evidence from %s failed: %s", vm.name, exc)
        if session.settings.keep_on_failure and vm.machine_alive():
            session.pool.keep(vm, node.nodeid)
            return
    try:
        session.pool.release(vm)
    except VMError as exc:  # the guest was dropped; the next test gets a fresh one
        log.warning("could not revert %s: %s", vm.name, exc)


@pytest.fixture
def _vm_image(request: pytest.FixtureRequest) -> str | None:
    """The image of this test's matrix cell (set by parametrization), or None when pinned."""
    return getattr(request, "param", None)


@pytest.fixture
def vm(request: pytest.FixtureRequest, _vm_image: str | None) -> Iterator[VM]:
    """A running guest for this test, reverted to its clean state afterwards.

    Configure with ``@pytest.mark.vm(image=..., memory_mb=..., cpus=..., network=...)``
    on the test, class or module; unpinned tests run once per ``--vm-image``.
    The guest boots at most once per (image, machine config) per run and is
    restored from a saved ready state after that.
    """
    spec = marker_spec(request.node)
    _require_capabilities(request, spec)
    config = MachineConfig(
        image=spec.image or _vm_image or DEFAULT_IMAGE,
        memory_mb=spec.memory_mb,
        cpus=spec.cpus,
        network=spec.network,
        sha256=spec.sha256,
        user=spec.user,
        firmware=spec.firmware,
    )
    session = _session(request)
    guest = session.pool.acquire(config)
    request.node.stash.setdefault(HELD_KEY, []).append(guest)
    try:
        yield guest
    finally:
        _give_back(session, guest, request.node)


class VMFactory:
    """``vm_factory(image=..., memory_mb=..., cpus=..., network=...)`` -> another running guest."""

    def __init__(self, request: pytest.FixtureRequest, default_image: str) -> None:
        self._request = request
        self._default = marker_spec(request.node)
        self._default_image = default_image
        self.guests: list[VM] = []

    def __call__(
        self,
        image: str | None = None,
        memory_mb: int | None = None,
        cpus: int | None = None,
        network: str | None = None,
        sha256: str | None = None,
        user: str | None = None,
        firmware: str | None = None,
    ) -> VM:
        where = f"{self._request.node.nodeid}: vm_factory"
        given = {
            "image": image, "memory_mb": memory_mb, "cpus": cpus, "network": network,
            "sha256": sha256, "user": user, "firmware": firmware,
        }
        kwargs = {k: v for k, v in given.items() if v is not None}
        try:
            spec = parse_marker(where, [((), kwargs)])
        except OptionError as exc:
            raise ValueError(str(exc)) from None
        config = MachineConfig(
            image=spec.image or self._default_image,
            memory_mb=spec.memory_mb if "memory_mb" in kwargs else self._default.memory_mb,
            cpus=spec.cpus if "cpus" in kwargs else self._default.cpus,
            network=spec.network if "network" in kwargs else self._default.network,
            # Your own image's digest, user and firmware go with the image they were given for.
            sha256=spec.sha256 if image is not None else self._default.sha256,
            user=spec.user if image is not None else self._default.user,
            firmware=spec.firmware if image is not None else self._default.firmware,
        )
        guest = _session(self._request).pool.acquire(config)
        self.guests.append(guest)
        self._request.node.stash.setdefault(HELD_KEY, []).append(guest)
        return guest

    def close(self) -> None:
        session = _session(self._request)
        while self.guests:
            _give_back(session, self.guests.pop(), self._request.node)


@pytest.fixture
def vm_factory(request: pytest.FixtureRequest, _vm_image: str | None) -> Iterator[VMFactory]:
    """Make more guests in one test: ``server = vm_factory(image="debian-12")``.

    Each call returns a distinct running guest; all are reverted (and kept
    for later tests) or discarded when the test ends.
    """
    spec = marker_spec(request.node)
    _require_capabilities(request, spec)
    factory = VMFactory(request, spec.image or _vm_image or DEFAULT_IMAGE)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def vm_network(request: pytest.FixtureRequest, vm_factory: VMFactory) -> Network:
    """A private L2 network for this test: ``server = vm_network.add("server", image="debian-12")``.

    Guests on it get static addresses (``server.ip``) and find each other by
    name (/etc/hosts); the network reaches neither the host nor anything else.
    ``vm_network.attach(vm, "name")`` puts a guest the test already has on it.
    """
    return Network(_session(request).pool.backend, vm_factory)
