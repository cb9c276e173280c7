"""What a recipe is once read: the resolved recipe, its files, its digest.

The builders and the catalog both import this module and nothing here imports
them, so the builders' version numbers (part of every image's cache key) live
here too.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Part of every recipe digest: bump it whenever a builder change changes what
# an image contains, so cached images built by older code are rebuilt.
BUILDER_VERSION = "1"
# The same for what only another builder than mmdebstrap writes: bumping one
# rebuilds the images that builder makes and leaves the others alone.
BUILDER_VARIANT_VERSIONS = {"extract": "1"}
DEFAULT_BUILDER = "mmdebstrap"

_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE_RE = re.compile(r"^([0-9]+)([KMGT]?)$")


@dataclass(frozen=True)
class RecipeFile:
    """A file the builder writes into the image, so recipes need no shell for config."""

    path: str
    content: str
    mode: int = 0o644


@dataclass(frozen=True)
class Recipe:
    """A fully resolved recipe (``extends`` already applied)."""

    name: str
    distribution: str
    release: str
    version: str
    architecture: str
    init: str
    variant: str
    packages: tuple[str, ...]
    disk_size: str
    kernel_cmdline: str
    user: str
    mirror: str
    description: str = ""
    extra_sources: tuple[str, ...] = ()
    files: tuple[RecipeFile, ...] = ()
    commands: tuple[str, ...] = ()
    builder: str = "mmdebstrap"
    # Where it came from, for messages; not part of the digest.
    source: Path | None = field(default=None, compare=False)

    @property
    def disk_size_bytes(self) -> int:
        """The disk size in bytes; validated at load time, so this cannot fail."""
        return parse_size(self.disk_size)

    def canonical(self) -> dict[str, Any]:
        """What the digest covers: everything that changes the built bytes.

        The description and source path are left out so that rewording a
        comment or moving a catalog does not force a rebuild. Keys added
        since the first images were built appear only when they differ from
        their default, so adding a key does not rebuild every cached image;
        ``exclude_packages`` is already applied to ``packages``.
        """
        document: dict[str, Any] = {
            "name": self.name,
            "distribution": self.distribution,
            "release": self.release,
            "version": self.version,
            "architecture": self.architecture,
            "init": self.init,
            "variant": self.variant,
            "packages": list(self.packages),
            "disk_size": self.disk_size,
            "kernel_cmdline": self.kernel_cmdline,
            "user": self.user,
            "mirror": self.mirror,
            "extra_sources": list(self.extra_sources),
            "files": [{"path": f.path, "content": f.content, "mode": f.mode} for f in self.files],
            "commands": list(self.commands),
        }
        if self.builder != DEFAULT_BUILDER:
            document["builder"] = [self.builder, BUILDER_VARIANT_VERSIONS[self.builder]]
        return document

    @property
    def digest(self) -> str:
        """Stable sha256 hex: the cache key of the image this recipe builds."""
        document = {"builder_version": BUILDER_VERSION, "recipe": self.canonical()}
        text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def parse_size(text: str) -> int:
    """Parse ``"3G"``-style sizes; powers of 1024, like qemu-img and resize2fs."""
    match = _SIZE_RE.match(text.strip().upper())
    if match is None:
        raise ValueError(f"bad size {text!r}")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]
