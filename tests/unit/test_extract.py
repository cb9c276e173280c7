"""The extract builder's parts, on hand-made ELF files and package trees: no download, no guest."""

from __future__ import annotations

import lzma
import os
import struct
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pytest_vmfixtures.errors import ImageError
from pytest_vmfixtures.images.catalog import RecipeFile, load_recipe
from pytest_vmfixtures.images.minimal import system as busybox_system
from pytest_vmfixtures.images.minimal.elf import ElfFile, modinfo, read_elf
from pytest_vmfixtures.images.minimal.extract import Unpacked, add_libraries, copy_package, copy_path, kernel_modules
from pytest_vmfixtures.images.minimal.fstree import Tree, usr_path

SHT_PROGBITS, SHT_STRTAB, SHT_DYNAMIC = 1, 3, 6


def make_elf(sections: list[tuple[str, int, bytes, str | None]], wide: bool = True) -> bytes:
    """A little-endian ELF file holding just ``(name, type, data, linked section)`` sections."""
    names = [name for name, *_ in sections] + [".shstrtab"]
    strings = b"\0" + b"".join(name.encode() + b"\0" for name in names)
    name_at = {name: strings.index(b"\0" + name.encode() + b"\0") + 1 for name in names}
    body = bytearray(64 if wide else 52)
    placed = []
    for data in [data for _, _, data, _ in sections] + [strings]:
        placed.append((len(body), len(data)))
        body += data + b"\0" * (-len(data) % 8)
    header = struct.Struct("<IIQQQQIIQQ" if wide else "<IIIIIIIIII")
    table = len(body)
    body += b"\0" * header.size  # the null section
    kinds = [kind for _, kind, _, _ in sections] + [SHT_STRTAB]
    links = [link for *_, link in sections] + [None]
    for name, kind, (offset, size), link in zip(names, kinds, placed, links, strict=True):
        index = names.index(link) + 1 if link else 0
        body += header.pack(name_at[name], kind, 0, 0, offset, size, index, 0, 1, 0)
    count = len(names) + 1
    ident = b"\x7fELF" + bytes([2 if wide else 1, 1, 1]) + b"\0" * 9
    layout = "<HHIQQQIHHHHHH" if wide else "<HHIIIIIHHHHHH"
    fields = (2, 62 if wide else 3, 1, 0, 0, table, 0, 64 if wide else 52, 0, 0, header.size, count, count - 1)
    body[: len(ident) + struct.calcsize(layout)] = ident + struct.pack(layout, *fields)
    return bytes(body)


def program(needed: list[str], interpreter: str | None = None, wide: bool = True) -> bytes:
    strings = b"\0" + b"".join(name.encode() + b"\0" for name in needed)
    entry = struct.Struct("<qQ" if wide else "<iI")
    dynamic = b"".join(entry.pack(1, strings.index(name.encode() + b"\0")) for name in needed) + entry.pack(0, 0)
    sections = [(".dynstr", SHT_STRTAB, strings, None), (".dynamic", SHT_DYNAMIC, dynamic, ".dynstr")]
    if interpreter is not None:
        sections.insert(0, (".interp", SHT_PROGBITS, interpreter.encode() + b"\0", None))
    return make_elf(sections, wide)


def module(depends: str) -> bytes:
    return make_elf([(".modinfo", SHT_PROGBITS, f"license=GPL\0depends={depends}\0name=x\0".encode(), None)])


@pytest.mark.parametrize("wide", [True, False])
def test_read_elf(wide: bool) -> None:
    data = program(["libfoo.so.1", "libc.so.6"], "/lib/ld-linux.so.2", wide)
    assert read_elf(data) == ElfFile("/lib/ld-linux.so.2", ("libfoo.so.1", "libc.so.6"))
    assert read_elf(program([], None, wide)) == ElfFile(None, ())


def test_bad_elf_is_value_error() -> None:
    with pytest.raises(ValueError):
        read_elf(b"#!/bin/sh\n")
    with pytest.raises(ValueError):
        read_elf(program(["libc.so.6"])[:80])
    with pytest.raises(ValueError, match="not a kernel module"):
        modinfo(program([]))


def test_modinfo() -> None:
    assert modinfo(module("virtio,virtio_ring"))["depends"] == "virtio,virtio_ring"


def test_kernel_modules_come_dependencies_first(tmp_path: Path) -> None:
    base = tmp_path / "lib/modules/6.1.0-1-cloud-amd64"
    (base / "kernel/drivers").mkdir(parents=True)
    (base / "kernel/drivers/a.ko").write_bytes(module("b,c_x"))
    (base / "kernel/drivers/b.ko").write_bytes(module(""))
    (base / "kernel/drivers/c-x.ko.xz").write_bytes(lzma.compress(module("b")))
    (base / "modules.builtin").write_text("kernel/drivers/built-in.ko\n")
    loaded = kernel_modules(tmp_path, "6.1.0-1-cloud-amd64", ["a", "built_in"])
    assert [name for name, _ in loaded] == ["b", "c_x", "a"]
    assert modinfo(dict(loaded)["c_x"])["depends"] == "b"  # stored uncompressed, as insmod takes it
    with pytest.raises(ImageError, match="has no virtio_blk module"):
        kernel_modules(tmp_path, "6.1.0-1-cloud-amd64", ["virtio_blk"])


def test_usr_path() -> None:
    assert usr_path("/lib64/ld-linux-x86-64.so.2") == "usr/lib64/ld-linux-x86-64.so.2"
    assert usr_path("bin/busybox") == "usr/bin/busybox"
    assert usr_path("etc/../etc/passwd") == "etc/passwd"
    assert usr_path("usr/lib/x") == "usr/lib/x"


def package(root: Path, name: str, files: dict[str, bytes | str]) -> Path:
    """An unpacked package: bytes are file contents, strings are symlink targets."""
    directory = root / name
    for relative, content in files.items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            os.symlink(content, path)
        else:
            path.write_bytes(content)
            path.chmod(0o755)
    return directory


def test_programs_come_with_their_loader_and_libraries(tmp_path: Path) -> None:
    libdir = "lib/x86_64-linux-gnu"
    packages = {
        "prog": package(tmp_path, "prog", {
            "usr/sbin/prog": program(["libfoo.so.1"], "/lib64/ld.so.2"),
            "usr/lib/prog/alias": "../../sbin/prog",
            "usr/share/doc/prog/copyright": b"text",
        }),
        "libfoo1": package(tmp_path, "libfoo1", {
            f"usr/{libdir}/libfoo.so.1": "libfoo.so.1.0",
            f"usr/{libdir}/libfoo.so.1.0": program(["libc.so.6"]),
        }),
        "libc6": package(tmp_path, "libc6", {
            f"{libdir}/libc.so.6": program([]),
            f"{libdir}/ld.so.2": program([]),
            "lib64/ld.so.2": f"/{libdir}/ld.so.2",
            f"{libdir}/libunused.so.1": program([]),
        }),
    }
    tree = Tree(mtime=0)
    copy_package(tree, packages["prog"])
    add_libraries(tree, Unpacked(packages))
    links = {path: m.target for path, m in tree.members.items() if m.kind == "link"}
    files = {path for path, m in tree.members.items() if m.kind == "file"}
    assert links == {
        "usr/lib/prog/alias": "/usr/sbin/prog",
        f"usr/{libdir}/libfoo.so.1": f"/usr/{libdir}/libfoo.so.1.0",
        "usr/lib64/ld.so.2": f"/usr/{libdir}/ld.so.2",
    }
    assert files == {"usr/sbin/prog", f"usr/{libdir}/libfoo.so.1.0", f"usr/{libdir}/libc.so.6", f"usr/{libdir}/ld.so.2"}
    assert tree.members["usr/sbin/prog"].mode == 0o755

    tree.file("usr/bin/other", program(["libbar.so.9"]))
    with pytest.raises(ImageError, match="needs libbar.so.9, which no downloaded package has"):
        add_libraries(tree, Unpacked(packages))


def test_tar_has_root_owners_and_parents_first(tmp_path: Path) -> None:
    tree = Tree(mtime=1700000000)
    tree.file("root/.ssh/authorized_keys", b"key\n", 0o600)
    tree.directory("home/user", 0o700, 1000, 1000)
    tree.link("bin", "usr/bin")
    tree.write_tar(tmp_path / "root.tar")
    with tarfile.open(tmp_path / "root.tar") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names.index("root") < names.index("root/.ssh") < names.index("root/.ssh/authorized_keys")
    key = next(m for m in members if m.name == "root/.ssh/authorized_keys")
    assert (key.uid, key.gid, key.mode, key.size, key.mtime) == (0, 0, 0o600, 4, 1700000000)
    assert next(m for m in members if m.name == "bin").linkname == "usr/bin"
    assert next(m for m in members if m.name == "home/user").uid == 1000


def parse_cpio(data: bytes) -> dict[str, tuple[int, int, bytes]]:
    """name -> (mode, uid, body), checking the "newc" alignment rules on the way."""
    entries: dict[str, tuple[int, int, bytes]] = {}
    offset = 0
    while True:
        assert data[offset : offset + 6] == b"070701" and offset % 4 == 0
        fields = [int(data[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        name_start = offset + 110
        name = data[name_start : name_start + fields[11] - 1].decode()
        body_start = name_start + fields[11] + (-(name_start + fields[11]) % 4)
        body = data[body_start : body_start + fields[6]]
        offset = body_start + fields[6] + (-(body_start + fields[6]) % 4)
        if name == "TRAILER!!!":
            assert offset == len(data)
            return entries
        entries[name] = (fields[1], fields[2], body)


def test_initramfs_cpio() -> None:
    cpio = busybox_system.initramfs(b"BUSYBOX", [("virtio", b"ko1"), ("virtio_blk", b"ko2")], mtime=0)
    entries = parse_cpio(cpio)
    assert entries["bin/busybox"] == (0o100755, 0, b"BUSYBOX")
    assert entries["bin/switch_root"][2] == b"busybox" and entries["bin/switch_root"][0] & 0o170000 == 0o120000
    assert entries["dev/console"][0] == 0o020600
    init = entries["init"][2].decode()
    assert entries["init"][0] == 0o100755
    assert "for module in virtio virtio_blk; do" in init
    assert "init=/sbin/init" in init and 'exec switch_root /newroot "$init"' in init
    assert 'init=*) init=${arg#init=}' in init  # a foreign build's second stage starts its own init


def test_dropbear_host_key_format() -> None:
    key = Ed25519PrivateKey.generate()
    blob = busybox_system.dropbear_host_key(key)
    (kind_length,) = struct.unpack(">I", blob[:4])
    assert blob[4 : 4 + kind_length] == b"ssh-ed25519"
    (secret_length,) = struct.unpack(">I", blob[4 + kind_length : 8 + kind_length])
    secret = blob[8 + kind_length :]
    assert secret_length == len(secret) == 64
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert secret[32:] == public


def test_system_files_and_guarantees() -> None:
    recipe = load_recipe("tiny")
    override = RecipeFile(path="/etc/hostname", content="mine\n")
    extra = RecipeFile(path="/etc/motd", content="hello\n", mode=0o600)
    recipe = type(recipe)(**{**recipe.__dict__, "files": (override, extra)})
    tree = Tree(mtime=0)
    busybox_system.write_system(tree, recipe, Ed25519PrivateKey.generate(), "ssh-ed25519 AAAA test", has_agent=True)
    members = tree.members
    assert members["etc/hostname"].data == b"tiny\n"  # the plugin's guarantee wins over the recipe
    assert (members["etc/motd"].data, members["etc/motd"].mode) == (b"hello\n", 0o600)
    assert members["root"].mode == members["root/.ssh"].mode == 0o700
    assert (members["root/.ssh/authorized_keys"].data, members["root/.ssh/authorized_keys"].mode) == (
        b"ssh-ed25519 AAAA test\n", 0o600,
    )
    assert b"ID=tiny\n" in members["etc/os-release"].data and b'VERSION_ID="1"' in members["etc/os-release"].data
    assert b"/etc/init.d/qemu-ga" in members["etc/inittab"].data
    assert members["bin"].kind == "link" and members["tmp"].mode == 0o1777
    assert members[busybox_system.DROPBEAR_HOST_KEY].mode == 0o600


def test_a_non_root_user_gets_a_home(tmp_path: Path) -> None:
    recipe = load_recipe("tiny")
    recipe = type(recipe)(**{**recipe.__dict__, "user": "tester"})
    tree = Tree(mtime=0)
    busybox_system.write_system(tree, recipe, Ed25519PrivateKey.generate(), "ssh-ed25519 AAAA test", has_agent=False)
    assert b"tester:x:1000:1000::/home/tester:/bin/sh" in tree.members["etc/passwd"].data
    assert tree.members["home/tester/.ssh/authorized_keys"].uid == 1000
    assert b"qemu-ga" not in tree.members["etc/inittab"].data


# -- crafted packages whose links lead out of the unpacked package --------------------------------


def crafted_package(tmp_path: Path) -> tuple[Path, Path]:
    """An unpacked package and a 'host' file beside it that no build may copy."""
    host_secret = tmp_path / "host" / "secret"
    host_secret.parent.mkdir()
    host_secret.write_text("host-only\n")
    package = tmp_path / "pkg"
    (package / "usr" / "bin").mkdir(parents=True)
    return package, host_secret


def test_a_relative_link_out_of_the_package_fails_and_copies_nothing(tmp_path: Path) -> None:
    package, secret = crafted_package(tmp_path)
    (package / "usr" / "bin" / "evil").symlink_to("../../../host/secret")
    tree = Tree(0)
    with pytest.raises(ImageError, match=r"/usr/bin/evil links to \.\./\.\./\.\./host/secret, outside its package"):
        copy_path(tree, package, "usr/bin/evil")
    assert not any(m.kind == "file" and b"host-only" in m.data for m in tree.members.values())


def test_a_directory_link_to_an_absolute_host_path_fails_and_copies_nothing(tmp_path: Path) -> None:
    package, secret = crafted_package(tmp_path)
    (package / "usr" / "lib").symlink_to(secret.parent)  # absolute, as a package's link to /etc would be
    tree = Tree(0)
    with pytest.raises(ImageError, match=r"/usr/lib/secret leads through a link to .*, outside its package"):
        copy_path(tree, package, "usr/lib/secret")
    assert not tree.members


def test_an_absolute_link_whose_target_leads_out_through_a_directory_link_fails(tmp_path: Path) -> None:
    package, secret = crafted_package(tmp_path)
    (package / "etc").symlink_to(secret.parent)
    (package / "usr" / "bin" / "tool").symlink_to("/etc/secret")
    tree = Tree(0)
    with pytest.raises(ImageError, match="outside its package"):
        copy_path(tree, package, "usr/bin/tool")
    assert not any(m.kind == "file" for m in tree.members.values())


def test_links_inside_the_package_still_copy(tmp_path: Path) -> None:
    package, _ = crafted_package(tmp_path)
    (package / "usr" / "bin" / "real").write_bytes(b"#!/bin/sh\n")
    (package / "usr" / "bin" / "alias").symlink_to("real")
    tree = Tree(0)
    copy_path(tree, package, "usr/bin/alias")
    assert tree.members["usr/bin/real"].data == b"#!/bin/sh\n"
