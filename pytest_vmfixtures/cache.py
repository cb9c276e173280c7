"""Moved to :mod:`pytest_vmfixtures.images.cache`; this path stays for hooks written against 0.1."""

from .images.cache import Cache, default_cache_dir, ensure_image, image_key

__all__ = ["Cache", "default_cache_dir", "ensure_image", "image_key"]
