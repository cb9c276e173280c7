"""qemu.build_command_line: the argv is pure, so its security and migration properties are checked here."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from pytest_vmfixtures.accel import AccelChoice
from pytest_vmfixtures.backends.base import MachineConfig
from pytest_vmfixtures.backends.common import KERNEL_ARGS, TB_SIZE_MB, mac_for
from pytest_vmfixtures.backends.qemu import MachinePaths, build_command_line
from pytest_vmfixtures.backends.qemu.memory import RamFile
from pytest_vmfixtures.channels.runner import PORT_NAME as RUNNER_PORT
from pytest_vmfixtures.errors import GuestError
from pytest_vmfixtures.images.image import BuiltImage, GuestOS

TCG = AccelChoice("tcg", "test")
KVM = AccelChoice("kvm", "test")
BINARY = "/opt/qemu/bin/qemu-system-x86_64"


@pytest.fixture
def image(tmp_path: Path) -> BuiltImage:
    directory = tmp_path / "images" / "debian-12-0123456789abcdef"
    directory.mkdir(parents=True)
    for name in ("disk.qcow2", "vmlinuz", "initrd.img", "id_ed25519"):
        (directory / name).write_bytes(b"")
    return BuiltImage(
        directory=directory,
        name="debian-12",
        recipe_digest="0" * 64,
        disk=directory / "disk.qcow2",
        disk_sha256="1" * 64,
        kernel=directory / "vmlinuz",
        initrd=directory / "initrd.img",
        cmdline="root=/dev/vda rw console=ttyS0 quiet",
        user="root",
        client_key=directory / "id_ed25519",
        host_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeFakeFakeFakeFakeFakeFakeFakeFakeFakeFake",
        arch="x86_64",
        os=GuestOS(id="debian", version="12", init="systemd", package_manager="apt"),
        agent=True,
        built_at=0.0,
        builder_version="1",
    )


def paths_in(tmp_path: Path, label: str) -> MachinePaths:
    files = tmp_path / "run" / "session" / label
    socks = tmp_path / "socks" / label
    files.mkdir(parents=True)
    socks.mkdir(parents=True)
    return MachinePaths(files, socks)


def option_values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == option]


def netdev(argv: list[str]) -> str:
    (value,) = option_values(argv, "-netdev")
    return value


def build(image: BuiltImage, tmp_path: Path, **kw) -> list[str]:
    config = kw.pop("config", MachineConfig(image="debian-12"))
    accel = kw.pop("accel", TCG)
    paths = kw.pop("paths", None) or paths_in(tmp_path, "m-1")
    port = kw.pop("port", 40022)
    return build_command_line(BINARY, image, config, accel, paths, port, **kw)


def test_binary_first_and_no_defaults(image: BuiltImage, tmp_path: Path) -> None:
    argv = build(image, tmp_path, name="debian-12-1")
    assert argv[0] == BINARY
    assert "-nodefaults" in argv and "-no-user-config" in argv
    assert option_values(argv, "-name") == ["guest=debian-12-1,debug-threads=on"]
    assert option_values(argv, "-display") == ["none"]
    assert all(isinstance(a, str) for a in argv)


def test_memory_and_cpus_come_from_the_config(image: BuiltImage, tmp_path: Path) -> None:
    argv = build(image, tmp_path, config=MachineConfig(image="debian-12", memory_mb=1536, cpus=3))
    assert option_values(argv, "-m") == ["1536"]
    assert option_values(argv, "-smp") == ["3"]


def test_network_is_restricted_by_default(image: BuiltImage, tmp_path: Path) -> None:
    assert "restrict=on" in netdev(build(image, tmp_path)).split(",")


def test_nat_network_lifts_the_restriction(image: BuiltImage, tmp_path: Path) -> None:
    argv = build(image, tmp_path, config=MachineConfig(image="debian-12", network="nat"))
    assert "restrict=off" in netdev(argv).split(",")
    assert "restrict=on" not in " ".join(argv)


@pytest.mark.parametrize("network", ["restricted", "nat"])
def test_ssh_forward_binds_loopback_only(image: BuiltImage, tmp_path: Path, network: str) -> None:
    argv = build(image, tmp_path, config=MachineConfig(image="debian-12", network=network), port=45678)
    forwards = [part for part in netdev(argv).split(",") if part.startswith("hostfwd=")]
    assert forwards == ["hostfwd=tcp:127.0.0.1:45678-:22"]
    assert [a for a in argv if "hostfwd" in a] == [netdev(argv)]
    assert "guestfwd" not in " ".join(argv)


def test_incoming_defer_only_when_restoring(image: BuiltImage, tmp_path: Path) -> None:
    cold = build(image, tmp_path, paths=paths_in(tmp_path, "a"))
    assert "-incoming" not in cold
    restore = build(image, tmp_path, paths=paths_in(tmp_path, "b"), incoming=True)
    assert option_values(restore, "-incoming") == ["defer"]
    assert restore.count("-incoming") == 1


def test_kvm_uses_the_host_cpu(image: BuiltImage, tmp_path: Path) -> None:
    argv = build(image, tmp_path, accel=KVM)
    assert option_values(argv, "-accel") == ["kvm"]
    assert option_values(argv, "-cpu") == ["host"]
    assert "tb-size" not in " ".join(argv)


def test_tcg_bounds_its_translation_cache(image: BuiltImage, tmp_path: Path) -> None:
    argv = build(image, tmp_path, accel=TCG)
    assert option_values(argv, "-accel") == [f"tcg,tb-size={TB_SIZE_MB}"]
    assert "-cpu" not in argv
    assert "kvm" not in " ".join(argv)


def test_agent_channel_only_when_the_image_has_an_agent(image: BuiltImage, tmp_path: Path) -> None:
    paths = paths_in(tmp_path, "m-1")
    with_agent = build(image, tmp_path, paths=paths)
    assert "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0" in option_values(with_agent, "-device")
    assert "virtio-serial-pci" in option_values(with_agent, "-device")
    assert f"socket,id=qga0,path={paths.agent},server=on,wait=off" in option_values(with_agent, "-chardev")

    without = build(replace(image, agent=False), tmp_path, paths=paths)
    joined = " ".join(without)
    assert "qga" not in joined and "guest_agent" not in joined and "virtio-serial" not in joined
    assert "runner" not in " ".join(with_agent)  # a built-in image: no vmfx-runner port (its states' keys stay)


def test_your_own_image_gets_the_runner_port_beside_the_agents(image: BuiltImage, tmp_path: Path) -> None:
    paths = paths_in(tmp_path, "c-1")
    seed = tmp_path / "seed.iso"
    seed.write_bytes(b"")
    argv = build(replace(image, kernel=None, initrd=None, cmdline="", firmware="bios", seed=seed), tmp_path, paths=paths)
    devices = option_values(argv, "-device")
    assert devices.index("virtserialport,chardev=qga0,name=org.qemu.guest_agent.0") < devices.index(
        f"virtserialport,chardev=runner0,name={RUNNER_PORT}")
    assert f"socket,id=runner0,path={paths.runner},server=on,wait=off" in option_values(argv, "-chardev")
    assert paths.runner.parent == paths.socks  # beside QMP's and the agent's, in the private socket directory


def test_sandbox_denies_spawning(image: BuiltImage, tmp_path: Path) -> None:
    (sandbox,) = option_values(build(image, tmp_path), "-sandbox")
    parts = sandbox.split(",")
    assert parts[0] == "on"
    assert "spawn=deny" in parts
    assert "elevateprivileges=deny" in parts


def test_sockets_live_in_the_socket_dir_and_files_in_the_file_dir(image: BuiltImage, tmp_path: Path) -> None:
    paths = paths_in(tmp_path, "m-7")
    argv = build(image, tmp_path, paths=paths)
    sockets = [v for v in option_values(argv, "-chardev") if v.startswith("socket,")]
    assert len(sockets) == 2  # qmp and the agent
    for chardev in sockets:
        path = Path(re.search(r"path=([^,]+)", chardev).group(1))  # type: ignore[union-attr]
        assert path.parent == paths.socks
    assert paths.qmp.parent == paths.socks and paths.agent.parent == paths.socks
    assert f"file,id=serial0,path={paths.console}" in option_values(argv, "-chardev")
    (drive,) = option_values(argv, "-drive")
    assert drive.startswith(f"file={paths.overlay},")
    assert "format=qcow2" in drive.split(",")
    assert paths.overlay.parent == paths.files and paths.console.parent == paths.files
    assert paths.pidfile.parent == paths.files and paths.stderr.parent == paths.files
    assert option_values(argv, "-mon") == ["chardev=qmp,mode=control"]


def test_the_guest_boots_the_image_kernel_directly(image: BuiltImage, tmp_path: Path) -> None:
    argv = build(image, tmp_path)
    assert option_values(argv, "-kernel") == [str(image.kernel)]
    assert option_values(argv, "-initrd") == [str(image.initrd)]
    assert option_values(argv, "-append") == [f"console=tty0 {image.cmdline} {KERNEL_ARGS}"]
    assert str(image.disk) not in " ".join(argv)  # the image is only ever a backing file


def test_x86_guests_show_the_kernel_console_on_the_screen_and_keep_serial_as_dev_console(image: BuiltImage, tmp_path: Path) -> None:
    """console=tty0 goes before the recipe's console=ttyS0: the last one named is /dev/console."""
    (line,) = option_values(build(image, tmp_path), "-append")
    consoles = [word for word in line.split() if word.startswith("console=")]
    assert consoles[0] == "console=tty0" and consoles[-1] == "console=ttyS0", line


@pytest.mark.parametrize("accel", [TCG, KVM], ids=["tcg", "kvm"])
@pytest.mark.parametrize("agent", [True, False], ids=["agent", "no-agent"])
@pytest.mark.parametrize("network", ["restricted", "nat"])
def test_boot_and_restore_differ_only_in_paths_port_and_incoming(
    image: BuiltImage, tmp_path: Path, accel: AccelChoice, agent: bool, network: str
) -> None:
    """Migration loads device state into a QEMU with the same devices; only host-side details may change."""
    image = replace(image, agent=agent)
    config = MachineConfig(image="debian-12", memory_mb=768, cpus=2, network=network)
    boot_paths, restore_paths = paths_in(tmp_path, "debian-12-1"), paths_in(tmp_path, "debian-12-2")
    boot = build_command_line(BINARY, image, config, accel, boot_paths, 40001, name="debian-12-1")
    restore = build_command_line(BINARY, image, config, accel, restore_paths, 40002, incoming=True, name="debian-12-2")

    def normalise(argv: list[str], paths: MachinePaths, port: int, name: str) -> list[str]:
        out = []
        for arg in argv:
            arg = arg.replace(str(paths.files), "<FILES>").replace(str(paths.socks), "<SOCKS>")
            arg = arg.replace(f"127.0.0.1:{port}-", "127.0.0.1:<PORT>-")
            arg = arg.replace(f"guest={name},", "guest=<NAME>,")  # the process label, not guest state
            # A restore appends to the console log its state's boot console begins: host side only.
            arg = arg.replace("console.log,append=on", "console.log")
            out.append(arg)
        return out

    incoming_at = restore.index("-incoming")
    assert restore[incoming_at : incoming_at + 2] == ["-incoming", "defer"]
    restore_without = restore[:incoming_at] + restore[incoming_at + 2 :]
    assert normalise(boot, boot_paths, 40001, "debian-12-1") == normalise(
        restore_without, restore_paths, 40002, "debian-12-2"
    )
    # the MAC is part of the migrated NIC state: same on both sides
    assert [d for d in boot if "mac=" in d] == [d for d in restore if "mac=" in d]


def test_device_order_is_stable(image: BuiltImage, tmp_path: Path) -> None:
    first = build(image, tmp_path, paths=paths_in(tmp_path, "a"))
    second = build(image, tmp_path, paths=paths_in(tmp_path, "b"))
    assert option_values(first, "-device") == option_values(second, "-device")


def test_mac_is_stable_local_and_per_image() -> None:
    mac = mac_for("debian-12")
    assert mac == mac_for("debian-12")
    assert re.fullmatch(r"52:54:00(:[0-9a-f]{2}){3}", mac)
    assert mac_for("debian-13") != mac
    assert len({mac_for(f"image-{i}") for i in range(50)}) == 50


def test_nic_uses_the_mac_of_the_configured_image(image: BuiltImage, tmp_path: Path) -> None:
    argv = build(image, tmp_path, config=MachineConfig(image="debian-12"))
    assert f"virtio-net-pci,netdev=net0,mac={mac_for('debian-12')}" in option_values(argv, "-device")


def test_commas_in_paths_are_doubled_so_they_cannot_add_options(image: BuiltImage, tmp_path: Path) -> None:
    paths = paths_in(tmp_path / "cache,format=raw", "m-1")
    argv = build(image, tmp_path, paths=paths)
    [drive] = [d for d in option_values(argv, "-drive") if "id=disk0" in d]
    assert drive.startswith(f"file={str(paths.overlay).replace(',', ',,')},if=none")
    # Split as QEMU does (a doubled comma is part of the value): no stray format=raw option appears.
    options = re.split(r"(?<!,),(?!,)", drive)
    assert "format=raw" not in options and "format=qcow2" in options
    for chardev in option_values(argv, "-chardev"):
        assert "cache,format=raw" not in chardev.replace(",,", "")


# -- other architectures ---------------------------------------------------------------------------

@pytest.mark.parametrize(("arch", "machine", "cpu"), [("aarch64", "virt", "cortex-a57"), ("riscv64", "virt", "rv64,sstc=off")])
def test_other_architectures_get_their_machine_and_a_fixed_tcg_cpu(
        image: BuiltImage, tmp_path: Path, arch: str, machine: str, cpu: str | None) -> None:
    argv = build(replace(image, arch=arch), tmp_path)
    assert option_values(argv, "-machine") == [machine]
    assert option_values(argv, "-cpu") == ([cpu] if cpu else [])
    assert "VGA" not in argv  # no VGA console on the virt machines
    assert option_values(argv, "-device")[:2] == ["virtio-blk-pci,drive=disk0", f"virtio-net-pci,netdev=net0,mac={mac_for('debian-12')}"]


def test_x86_keeps_the_pc_machine_and_its_vga(image: BuiltImage, tmp_path: Path) -> None:
    for arch in ("x86_64", "i386"):
        argv = build(replace(image, arch=arch), tmp_path, paths=paths_in(tmp_path, arch))
        assert option_values(argv, "-machine") == ["pc"]
        assert "VGA" in argv


def test_kvm_on_an_arm64_host_uses_its_cpu(image: BuiltImage, tmp_path: Path) -> None:
    # The backend passes KVM only for a guest of the host's architecture (accel.guest_accel).
    argv = build(replace(image, arch="aarch64"), tmp_path, accel=KVM)
    assert option_values(argv, "-accel") == ["kvm"]
    assert option_values(argv, "-cpu") == ["host"]


def test_an_unknown_architecture_is_a_guest_error_naming_it(image: BuiltImage, tmp_path: Path) -> None:
    with pytest.raises(GuestError, match="architecture 'sparc64'"):
        build(replace(image, arch="sparc64"), tmp_path)


def test_only_riscv_guests_get_a_gdbstub_and_only_on_their_private_socket(image: BuiltImage, tmp_path: Path) -> None:
    paths = paths_in(tmp_path, "rv")
    argv = build(replace(image, arch="riscv64"), tmp_path, paths=paths)
    assert option_values(argv, "-gdb") == ["chardev:gdb0"]
    assert f"socket,id=gdb0,path={paths.socks / 'gdb'},server=on,wait=off" in option_values(argv, "-chardev")
    assert "tcp" not in " ".join(option_values(argv, "-chardev"))
    assert "-gdb" not in build(image, tmp_path, paths=paths_in(tmp_path, "x86"))


def test_only_firmware_booted_guests_get_a_balloon_that_reports_free_pages(image: BuiltImage, tmp_path: Path) -> None:
    """A cloud image's kernel command line is the vendor's (no init_on_free=1): the balloon zeroes what it frees."""
    assert not [d for d in option_values(build(image, tmp_path), "-device") if "balloon" in d]
    seed = tmp_path / "seed.iso"
    seed.write_bytes(b"")
    cloud = replace(image, kernel=None, initrd=None, cmdline="", firmware="bios", seed=seed, agent=False)
    devices = option_values(build(cloud, tmp_path, paths=paths_in(tmp_path, "cloud")), "-device")
    assert devices[-1] == "virtio-balloon-pci,id=balloon0,free-page-reporting=on"  # last: the other slots stay
    assert "-append" not in build(cloud, tmp_path, paths=paths_in(tmp_path, "cloud-2"))


def test_mapped_ram_names_its_file_backend_on_the_machine(image: BuiltImage, tmp_path: Path) -> None:
    """A mapped state's guest: the cold boot shares its RAM file, a restore maps the state's privately
    (on QEMU 8.2+ read-only opened), and neither gets the balloon that would punch holes in it."""
    paths = paths_in(tmp_path, "m-1")
    boot = build(image, tmp_path, paths=paths, ram=RamFile(paths.ram, shared=True))
    assert option_values(boot, "-machine") == ["pc,memory-backend=ram0"]
    assert option_values(boot, "-object") == [f"memory-backend-file,id=ram0,size=512M,mem-path={paths.ram},share=on"]
    state_ram = tmp_path / "states" / "s,x" / "ram"
    restore = build(image, tmp_path, paths=paths_in(tmp_path, "m-2"), ram=RamFile(state_ram, shared=False, read_only=True), incoming=True,
                    config=MachineConfig(image="debian-12", memory_mb=1024))
    (backend,) = option_values(restore, "-object")
    assert backend == f"memory-backend-file,id=ram0,size=1024M,mem-path={tmp_path}/states/s,,x/ram,share=off,readonly=on,rom=off"
    assert option_values(restore, "-m") == ["1024"]
    seed = tmp_path / "seed.iso"
    seed.write_bytes(b"")
    cloud = replace(image, kernel=None, initrd=None, cmdline="", firmware="bios", seed=seed, agent=False)
    devices = option_values(build(cloud, tmp_path, paths=paths_in(tmp_path, "c"), ram=RamFile(paths.ram, shared=True)), "-device")
    assert not [d for d in devices if "balloon" in d]
    assert "-object" not in build(image, tmp_path, paths=paths_in(tmp_path, "stream"))


def test_the_whole_argv_is_pinned(image: BuiltImage, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two command lines written out in full. The argv is the guest's hardware, which every saved state is
    made for: a change here (order included) must be deliberate, and says that states may need remaking."""
    from pytest_vmfixtures.backends.qemu import command

    monkeypatch.setattr(command, "find_ovmf", lambda: (Path("/ovmf/CODE.fd"), Path("/ovmf/VARS.fd")))
    paths = MachinePaths(Path("/run/s/m-1"), Path("/socks/m-1"))
    built_in = replace(image, kernel=Path("/img/vmlinuz"), initrd=Path("/img/initrd.img"))
    restore = build_command_line("qemu-system-x86_64", built_in, MachineConfig(image="debian-12"), TCG, paths, 40022,
                                 incoming=True, name="debian-12-1")
    assert " ".join(restore) == (
        "qemu-system-x86_64 -name guest=debian-12-1,debug-threads=on -no-user-config -nodefaults -machine pc "
        "-display none -m 512 -smp 1 -accel tcg,tb-size=128 "
        "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny "
        "-kernel /img/vmlinuz -append console=tty0 root=/dev/vda rw console=ttyS0 quiet init_on_free=1 "
        "-initrd /img/initrd.img "
        "-drive file=/run/s/m-1/overlay.qcow2,if=none,id=disk0,format=qcow2,cache=unsafe,discard=unmap "
        "-device virtio-blk-pci,drive=disk0 -netdev user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:40022-:22 "
        f"-device virtio-net-pci,netdev=net0,mac={mac_for('debian-12')} -device virtio-rng-pci -device VGA "
        "-chardev file,id=serial0,path=/run/s/m-1/console.log,append=on -serial chardev:serial0 "
        "-chardev socket,id=qmp,path=/socks/m-1/qmp,server=on,wait=off -mon chardev=qmp,mode=control "
        "-device virtio-serial-pci -chardev socket,id=qga0,path=/socks/m-1/qga,server=on,wait=off "
        "-device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0 -incoming defer"
    )
    cloud = replace(image, kernel=None, initrd=None, cmdline="", firmware="uefi", seed=Path("/seeds/seed.iso"), agent=False)
    boot = build_command_line("qemu-system-x86_64", cloud, MachineConfig(image="debian-12"), KVM, paths, 40023, name="c-1")
    assert " ".join(boot) == (
        "qemu-system-x86_64 -name guest=c-1,debug-threads=on -no-user-config -nodefaults -machine pc "
        "-display none -m 512 -smp 1 -accel kvm -cpu host "
        "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny "
        "-drive if=pflash,format=raw,unit=0,readonly=on,file=/ovmf/CODE.fd "
        "-drive if=pflash,format=qcow2,unit=1,file=/run/s/m-1/nvram.qcow2 "
        "-drive file=/run/s/m-1/overlay.qcow2,if=none,id=disk0,format=qcow2,cache=unsafe,discard=unmap "
        "-device virtio-blk-pci,drive=disk0,bootindex=0 -device virtio-scsi-pci,id=scsi0 "
        "-drive file=/seeds/seed.iso,if=none,id=seed0,format=raw,readonly=on,media=cdrom "
        "-device scsi-cd,drive=seed0,bus=scsi0.0 -netdev user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:40023-:22 "
        f"-device virtio-net-pci,netdev=net0,mac={mac_for('debian-12')} -device virtio-rng-pci -device VGA "
        "-chardev file,id=serial0,path=/run/s/m-1/console.log -serial chardev:serial0 "
        "-chardev socket,id=qmp,path=/socks/m-1/qmp,server=on,wait=off -mon chardev=qmp,mode=control "
        "-device virtio-balloon-pci,id=balloon0,free-page-reporting=on"
    )
