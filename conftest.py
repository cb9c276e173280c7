"""Shared by the project's tests and examples: nothing but what every run needs.

The plugin registers itself through its pytest11 entry point; pytester is
for the tests that run pytest inside pytest.
"""

pytest_plugins = ("pytester",)
