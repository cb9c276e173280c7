"""The description of a built image, as read from its ``image.json``.

The builder writes ``image.json`` last, so its presence marks a complete
image; everything that boots a guest reads the image through this class
rather than guessing file names.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ImageError

MANIFEST_NAME = "image.json"
# What a built recipe's directory holds besides the manifest (cloud images name their own disk).
DISK_NAME = "disk.qcow2"
KERNEL_NAME = "vmlinuz"
INITRD_NAME = "initrd.img"


@dataclass(frozen=True)
class GuestOS:
    """What runs inside, so tests and fixtures can branch on it."""

    id: str
    version: str
    init: str
    package_manager: str
    arch: str = ""  # as the guest's ``uname -m`` prints it


@dataclass(frozen=True)
class BuiltImage:
    """A complete image directory; paths are absolute.

    ``kernel`` and ``initrd`` are None for an image that boots through
    firmware from its own bootloader (``firmware`` "bios" or "uefi"), as a
    cloud image does; such an image may also carry a cloud-init ``seed``
    volume and keep its disk outside ``directory`` (a user's own file).
    """

    directory: Path
    name: str
    recipe_digest: str
    disk: Path
    disk_sha256: str
    kernel: Path | None
    initrd: Path | None
    cmdline: str
    user: str
    client_key: Path
    host_key: str
    arch: str
    os: GuestOS
    agent: bool
    built_at: float
    builder_version: str
    firmware: str = ""  # "" boots ``kernel`` directly; "bios" or "uefi" boot the disk
    seed: Path | None = None  # a NoCloud seed attached as a read-only CD-ROM
    disk_format: str = "qcow2"

    @property
    def firmware_boot(self) -> bool:
        return self.kernel is None

    @classmethod
    def load(cls, directory: Path) -> BuiltImage:
        """Read ``directory/image.json``; a missing or bad one means "rebuild"."""
        directory = directory.resolve()
        manifest = directory / MANIFEST_NAME
        hint = f"delete {directory} so it is built again"
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ImageError(f"{manifest} is missing (incomplete build); {hint}") from None
        except (OSError, ValueError) as exc:
            raise ImageError(f"{manifest} is unreadable ({exc}); {hint}") from exc
        try:
            image = cls._from_dict(directory, data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ImageError(f"{manifest} has a bad or missing field ({exc}); {hint}") from exc
        for path in (image.disk, image.kernel, image.initrd, image.client_key, image.seed):
            if path is not None and not path.is_file():
                raise ImageError(f"{manifest} names {path.name}, which is missing; {hint}")
        return image

    @classmethod
    def _from_dict(cls, directory: Path, data: Any) -> BuiltImage:
        if not isinstance(data, dict):
            raise TypeError("top level is not an object")
        os_data = data["os"]
        if not isinstance(os_data, dict):
            raise TypeError("'os' is not an object")
        agent = data["agent"]
        if not isinstance(agent, bool):
            raise TypeError("'agent' is not a boolean")
        return cls(
            directory=directory,
            name=_str(data, "name"),
            recipe_digest=_str(data, "recipe_digest"),
            disk=directory / _file_name(data, "disk"),
            disk_sha256=_str(data, "disk_sha256"),
            kernel=_optional_file(directory, data, "kernel"),
            initrd=_optional_file(directory, data, "initrd"),
            cmdline=_str(data, "cmdline"),
            user=_str(data, "user"),
            client_key=directory / _file_name(data, "client_key"),
            host_key=_str(data, "host_key"),
            arch=_str(data, "arch"),
            os=GuestOS(
                id=_str(os_data, "id"),
                version=_str(os_data, "version"),
                init=_str(os_data, "init"),
                package_manager=_str(os_data, "package_manager"),
                arch=str(os_data.get("arch", "")),
            ),
            agent=agent,
            built_at=float(data["built_at"]),
            builder_version=_str(data, "builder_version"),
            firmware=str(data.get("firmware", "")),
            seed=_optional_file(directory, data, "seed"),
            disk_format=str(data.get("disk_format", "qcow2")),
        )

    def to_dict(self) -> dict[str, Any]:
        """The manifest form: file names relative, so the directory can move."""
        return {
            "name": self.name,
            "recipe_digest": self.recipe_digest,
            "disk": self.disk.name,
            "disk_sha256": self.disk_sha256,
            "kernel": self.kernel.name if self.kernel is not None else None,
            "initrd": self.initrd.name if self.initrd is not None else None,
            "cmdline": self.cmdline,
            "user": self.user,
            "client_key": self.client_key.name,
            "host_key": self.host_key,
            "arch": self.arch,
            "os": {
                "id": self.os.id,
                "version": self.os.version,
                "init": self.os.init,
                "package_manager": self.os.package_manager,
                "arch": self.os.arch,
            },
            "agent": self.agent,
            "built_at": self.built_at,
            "builder_version": self.builder_version,
            "firmware": self.firmware,
            "seed": self.seed.name if self.seed is not None else None,
            "disk_format": self.disk_format,
        }

    def save(self) -> None:
        """Write the manifest atomically: a reader sees no manifest or a whole one."""
        manifest = self.directory / MANIFEST_NAME
        temporary = manifest.with_name(MANIFEST_NAME + ".tmp")
        temporary.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        temporary.chmod(0o444)
        os.replace(temporary, manifest)


def _str(data: dict[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise TypeError(f"{key!r} is not a string")
    return value


def _optional_file(directory: Path, data: dict[str, Any], key: str) -> Path | None:
    return None if data.get(key) is None else directory / _file_name(data, key)


def _file_name(data: dict[str, Any], key: str) -> str:
    """A bare file name: a manifest must not point outside its directory."""
    value = _str(data, key)
    if not value or "/" in value or value in (".", ".."):
        raise ValueError(f"{key!r} must be a file name in the image directory")
    return value
