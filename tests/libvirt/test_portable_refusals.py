"""The portable path (a libvirt driver that is not QEMU's) refuses an image it cannot boot before it
converts or copies anything, and a guest that fails to start leaves no disk copy (review finding M4).

libvirt's own test driver (``test:///default``) stands for the other hypervisors; it runs no guest.
"""

from __future__ import annotations

import pytest
from rig import import_libvirt  # noqa: E402

from pytest_vmfixtures.backends.base import MachineConfig
from pytest_vmfixtures.backends.libvirt import LibvirtBackend
from pytest_vmfixtures.errors import ImageError
from pytest_vmfixtures.images.cache import Cache, ensure_image
from pytest_vmfixtures.images.catalog import BUILTIN_IMAGES_DIR

libvirt = import_libvirt()




def test_a_kernel_boot_image_is_refused_before_any_copy(test_driver_backend: LibvirtBackend, cache: Cache) -> None:
    image = ensure_image(cache, "tiny", [BUILTIN_IMAGES_DIR], lambda message: None)  # boots by direct kernel load
    converted = set((cache.root / "converted").iterdir()) if (cache.root / "converted").is_dir() else set()
    for attempt in range(2):
        with pytest.raises(ImageError, match="direct kernel load"):
            test_driver_backend.boot(image, MachineConfig("tiny"), f"refused-{attempt}")
    assert not list(test_driver_backend.runtime.run_dir.glob("*/disk.*"))  # no per-guest copy, left or made
    now = set((cache.root / "converted").iterdir()) if (cache.root / "converted").is_dir() else set()
    assert now == converted  # and no conversion of a disk that cannot boot there
    assert test_driver_backend.placement.machines() == []
