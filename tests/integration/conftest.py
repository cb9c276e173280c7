"""Integration tests boot real guests (debian-12 by default) under the accel auto picks."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:  # a conftest's hook sees the whole session's items: mark only this directory's
        if "tests/integration" in str(item.path):
            item.add_marker(pytest.mark.integration)
