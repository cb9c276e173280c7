"""Moved to :mod:`pytest_vmfixtures.images.image`; this path stays for hooks written against 0.1."""

from .images.image import BuiltImage, GuestOS

__all__ = ["BuiltImage", "GuestOS"]
