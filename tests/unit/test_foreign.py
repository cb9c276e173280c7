"""Foreign-architecture builds: what runs on the host runs nothing of the guest's, and stage two's shape."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_vmfixtures.arch import ARCHES
from pytest_vmfixtures.errors import ImageError
from pytest_vmfixtures.images import foreign
from pytest_vmfixtures.images.builder import host_tools
from pytest_vmfixtures.images.catalog import load_recipe
from pytest_vmfixtures.images.mmdebstrap import GUEST_STAGE


def test_stage_one_only_unpacks_without_emulation_or_chroot(tmp_path: Path) -> None:
    recipe = load_recipe("debian-12-arm64")
    command = foreign.extract_command(recipe, tmp_path / "stage.tar", tmp_path / "root.ext2", tmp_path / "host")
    assert command[0] == "mmdebstrap"
    assert "--variant=extract" in command and "--architectures=arm64" in command
    assert not any("chroot" in part or "customize-hook" in part for part in command)
    assert "--skip=cleanup/apt" in command  # stage two installs from the kept .debs
    assert "--include=?essential" in command
    [included] = [part for part in command if part.startswith("--include=") and "?" not in part]
    assert included.split("=", 1)[1].split(",") == ["apt", *recipe.packages, foreign.INITRAMFS_PACKAGE]
    assert command[-5:-3] == ["bookworm", str(tmp_path / "root.ext2")]


def test_stage_two_boots_the_unpacked_kernel_into_the_install_script(tmp_path: Path) -> None:
    argv = foreign.stage2_command("qemu-system-aarch64", ARCHES["arm64"], tmp_path / "k", tmp_path / "i",
                                  tmp_path / "root", tmp_path / "out", tmp_path / "console", 2)
    assert argv[0] == "qemu-system-aarch64" and "-no-reboot" in argv
    assert argv[argv.index("-machine") + 1] == "virt" and argv[argv.index("-cpu") + 1] == "cortex-a57"
    assert argv[argv.index("-accel") + 1].startswith("tcg")
    append = argv[argv.index("-append") + 1]
    assert f"init={GUEST_STAGE}/{foreign.STAGE2_NAME}" in append and "console=ttyAMA0" in append
    assert "panic=-1" in append  # a crash of the script ends QEMU instead of hanging the build
    assert "-netdev" not in argv and "-nic" not in argv  # installs offline


def test_the_install_script_leaves_out_the_initramfs_only_package() -> None:
    script = foreign.stage2_script(load_recipe("debian-12-arm64")).decode()
    assert f"{foreign.INITRAMFS_PACKAGE}_*" in script
    assert "dpkg --force-depends --force-unsafe-io --install $debs" in script
    assert 'tar -cf /dev/vdb -C "$stage/out" .' in script
    # mkinitramfs is kept from running under emulation, and update-initramfs is restored afterwards.
    divert, restore = script.index("--add /usr/sbin/update-initramfs"), script.index("--remove /usr/sbin/update-initramfs")
    assert divert < script.index("dpkg --force-depends") < restore < script.index("customize.sh")
    assert "VMFIXTURES_HOST_INITRD=1 sh" in script
    assert script.rstrip().endswith("finish")


def test_a_foreign_recipe_needs_its_emulator_not_arch_test() -> None:
    tools = host_tools(load_recipe("debian-12-arm64"))
    assert tools["qemu-system-aarch64"] == "qemu-system-arm"
    assert "arch-test" not in tools
    assert host_tools(load_recipe("debian-13-riscv64"))["qemu-system-riscv64"] == "qemu-system-misc"


def test_results_are_taken_from_the_output_disk_by_name_only(tmp_path: Path) -> None:
    import io
    import tarfile

    out = tmp_path / "out.raw"
    with tarfile.open(out, "w") as tar:
        for name, data in (("./facts", b"agent=1\n"), ("./vmlinuz", b"K"), ("./../escape", b"x"), ("./initrd.img", b"I")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    results = tmp_path / "results"
    results.mkdir()
    foreign._read_results(out, results)
    assert sorted(p.name for p in results.iterdir()) == ["facts", "vmlinuz"]  # the initrd is the host's
    assert not (tmp_path / "escape").exists()


def test_a_second_stage_that_writes_nothing_fails_with_the_console(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A QEMU stand-in that prints what a failed guest prints and powers off. This is the only check of
    # this failure path: no test builds a broken foreign recipe for real (an emulated build takes minutes).
    work = tmp_path / "work"
    (work / "host" / "boot").mkdir(parents=True)
    monkeypatch.setattr(foreign, "initramfs", lambda host: (tmp_path / "k", b"cpio"))
    fake = tmp_path / "qemu"
    fake.write_text('#!/bin/sh\nfor a; do case "$a" in file:*) c=${a#file:} ;; esac; done\n'
                    'echo "vmfixtures-stage2: FAILED: apt could not install the packages" > "$c"\n')
    fake.chmod(0o755)
    seen: list[str] = []
    with pytest.raises(ImageError, match="failed under emulation") as info:
        foreign.run_stage2(load_recipe("debian-12-arm64"), ARCHES["arm64"], str(fake), work, tmp_path / "root", seen.append)
    assert "apt could not install the packages" in str(info.value)
    assert "second stage: FAILED: apt could not install the packages" in seen


def test_an_architecture_the_release_lacks_is_an_image_error_naming_both(tmp_path: Path) -> None:
    from dataclasses import replace

    from pytest_vmfixtures.images.builder import build_image

    recipe = replace(load_recipe("debian-12"), name="bookworm-riscv", architecture="riscv64")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ImageError, match="debian bookworm has no riscv64 release; it has amd64, arm64, i386"):
        build_image(recipe, out)
    assert list(out.iterdir()) == []  # refused before anything was written


def test_a_variant_a_foreign_build_cannot_make_is_refused_by_name(tmp_path: Path) -> None:
    from dataclasses import replace

    recipe = replace(load_recipe("debian-12-arm64"), variant="buildd")
    with pytest.raises(ImageError, match="variant 'buildd' cannot be built for another architecture"):
        foreign.extract_command(recipe, tmp_path / "s.tar", tmp_path / "r.ext2", tmp_path / "h")


def test_stage2_drive_paths_with_commas_are_escaped(tmp_path: Path) -> None:
    """A comma in a cache path is written twice in -drive, so QEMU cannot take the rest for options (finding L10)."""
    root, out = tmp_path / "ci,cache" / "root.ext2", tmp_path / "ci,cache" / "out.img"
    argv = foreign.stage2_command("qemu-system-aarch64", ARCHES["arm64"], tmp_path / "k", tmp_path / "i", root, out,
                                  tmp_path / "console.log", 2)
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert drives[0].startswith(f"file={tmp_path}/ci,,cache/root.ext2,format=raw,")
    assert drives[1].startswith(f"file={tmp_path}/ci,,cache/out.img,format=raw,")


def _stage2_in_a_child(tmp_path: Path, stub: Path) -> subprocess.Popen[bytes]:
    """run_stage2 on the stub QEMU ``stub``, in a process of its own that the test can kill."""
    script = f"""
import sys
from pathlib import Path
from pytest_vmfixtures.images import foreign
from pytest_vmfixtures.arch import ARCHES
from pytest_vmfixtures.images.catalog import load_recipe
work = Path({str(tmp_path / "work")!r})
(work / "host" / "boot").mkdir(parents=True)
foreign.initramfs = lambda host: (Path({str(tmp_path / "k")!r}), b"cpio")
try:
    foreign.run_stage2(load_recipe("debian-12-arm64"), ARCHES["arm64"], {str(stub)!r}, work, Path({str(tmp_path / "root")!r}),
                       lambda message: None, timeout=120)
except Exception as exc:
    print("ended:", type(exc).__name__, str(exc).splitlines()[0], flush=True)
"""
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_the_second_stage_qemu_dies_with_the_build(tmp_path: Path) -> None:
    """L4: a SIGKILLed pytest (CI cancel, OOM) takes its emulated QEMU with it (a STUB QEMU that sleeps)."""
    pids = tmp_path / "stub.pid"
    stub = tmp_path / "qemu"
    stub.write_text(f"#!/bin/sh\necho $$ > {pids}\nexec sleep 300\n")
    stub.chmod(0o755)
    build = _stage2_in_a_child(tmp_path, stub)
    try:
        deadline = time.monotonic() + 60
        while not pids.exists() or not pids.read_text().strip():
            assert build.poll() is None and time.monotonic() < deadline, build.communicate()[0].decode()
            time.sleep(0.1)
        stub_pid = int(pids.read_text())
        build.kill()
        build.communicate()
        deadline = time.monotonic() + 30
        while _running(stub_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(stub_pid)
    finally:
        if build.poll() is None:
            build.kill()
            build.communicate()


def test_a_second_stage_that_floods_stderr_still_ends(tmp_path: Path) -> None:
    """L4: over 64 KiB on stderr no longer blocks QEMU on a pipe nobody reads (a STUB QEMU writing 1 MiB)."""
    stub = tmp_path / "qemu"
    stub.write_text("#!/bin/sh\nhead -c 1048576 /dev/zero >&2\nexit 1\n")
    stub.chmod(0o755)
    build = _stage2_in_a_child(tmp_path, stub)
    try:
        output, _ = build.communicate(timeout=300)
    finally:
        if build.poll() is None:
            build.kill()
            build.communicate()
    assert b"ended: ImageError" in output and b"failed under emulation" in output  # not "did not finish"


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
