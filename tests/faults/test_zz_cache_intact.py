"""After everything else, every cached image and state is as it was made.

Runs last in its session (tests/faults/conftest.py moves it to the end); scripts/test runs it once more on
its own after all its runs, including the background job, so damage done by any run is seen."""

from __future__ import annotations

import stat

from pytest_vmfixtures.backends.qemu.backend import qemu_version
from pytest_vmfixtures.backends.qemu.memory import RAM_NAME, opens_read_only
from pytest_vmfixtures.fixtures import SESSION_KEY
from pytest_vmfixtures.images.cache import Cache


def test_base_images_and_states_unchanged(request) -> None:
    cache = Cache(request.config.stash[SESSION_KEY].settings.cache_dir)
    entries = [p for kind in ("images", "states") if (cache.root / kind).is_dir() for p in (cache.root / kind).iterdir()]
    assert entries, "the suite should have used at least one cached image"
    # QEMU before 8.2 opens a mapped state's RAM file read-write (it maps it privately): the first restore
    # gives the owner its write bit back (memory.make_openable). Its bytes are still the manifest's.
    ram_owner_writable = not opens_read_only(qemu_version("qemu-system-x86_64"))
    for entry in entries:
        assert Cache.check_manifest(entry) is None, f"{entry} changed"
        for name in cache.read_manifest(entry)["files"]:  # type: ignore[union-attr]
            mode = (entry / name).stat().st_mode
            writers = stat.S_IWGRP | stat.S_IWOTH | (0 if name == RAM_NAME and ram_owner_writable else stat.S_IWUSR)
            assert not mode & writers, f"{entry / name} is writable"
