"""Moved to :mod:`pytest_vmfixtures.images.catalog`; this path stays for hooks written against 0.1."""

from .images.catalog import BUILTIN_IMAGES_DIR, available_recipes, load_recipe
from .images.recipe import Recipe

__all__ = ["BUILTIN_IMAGES_DIR", "Recipe", "available_recipes", "load_recipe"]
