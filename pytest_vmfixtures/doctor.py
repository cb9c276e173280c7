"""``pytest-vmfixtures doctor``: can this host run guests, and how fast?

Each check gives one line: ``ok``, ``warn`` (works, but slower or riskier
than it could be), ``fail`` (a needed thing is missing) or ``info`` (missing,
but only other images than this run's would need it), with what to do.
What is needed follows the images asked about (``--image``; the pytest header
takes the run's ``--vm-image`` list). The pytest header shows the same
verdict in one line.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .accel import choose_accel, guest_accel, kvm_problem, probe_host
from .arch import ARCHES, is_native, missing_firmware
from .backends.libvirt.uris import DEFAULT_LIBVIRT_POOL
from .images.byo import is_byo
from .images.catalog import BUILTIN_IMAGES_DIR
from .options import DEFAULT_IMAGE
from .runtime import pid_alive, session_lock_held

OK, WARN, FAIL, INFO = "ok", "warn", "fail", "info"
MIN_FREE_GIB = 5


@dataclass(frozen=True)
class Check:
    status: str
    name: str
    message: str

    def line(self) -> str:
        return f"[{self.status:>4}] {self.name}: {self.message}"


def _version(argv: Sequence[str]) -> str | None:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"version (\S+)", out)
    return match.group(1) if match else (out.strip().splitlines() or [""])[0]


def check_qemu(binary: str, versions: bool = True, backend: str = "qemu") -> Check:
    if backend != "qemu":  # libvirt's QEMU runs on the libvirt host; this one converts and inspects disks
        found = shutil.which("qemu-img")
        return Check(OK, "qemu", f"{found} (libvirt runs the guests)") if found else \
            Check(FAIL, "qemu", "qemu-img not found: install qemu-utils")
    path = shutil.which(binary)
    if path is None:
        return Check(FAIL, "qemu", f"{binary} not found: install QEMU (Debian/Ubuntu: apt install qemu-system-x86 qemu-utils)")
    if shutil.which("qemu-img") is None:
        return Check(FAIL, "qemu", "qemu-img not found: install qemu-utils")
    return Check(OK, "qemu", f"{path}, version {_version([binary, '--version'])}" if versions else path)


def check_kvm() -> Check:
    facts = probe_host()
    problem = kvm_problem(facts)
    if problem is None:
        return Check(OK, "kvm", "usable: guests run at native speed")
    if facts.kvm_device and not facts.kvm_accessible and any(m in facts.modules for m in ("kvm_intel", "kvm_amd")):
        try:
            group = grp.getgrgid(os.stat("/dev/kvm").st_gid).gr_name
        except (KeyError, OSError):
            group = "kvm"
        return Check(WARN, "kvm", f"/dev/kvm is not accessible to this user: sudo usermod -aG {group} $USER, then log in again")
    if not facts.kvm_device:
        flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        if not re.search(r"\b(vmx|svm)\b", flags):
            problem += (
                "; the CPU shows no vmx/svm: virtualization is off in firmware,"
                " or nested virtualization is off in the parent hypervisor"
            )
    return Check(WARN, "kvm", f"not used: {problem}; guests run under TCG (software emulation)")


def check_arches(requested: str = "auto", needed: Sequence[str] | None = None,
                 binaries: dict[str, str] | None = None) -> list[Check]:
    """Which guest architectures this host can run (emulator and firmware installed), and how.

    ``needed``: the Debian architectures of this run's images (None: all); one of them missing is a
    failure, any other missing is information. ``binaries``: QEMU target -> the emulator to use (--vm-qemu-binary).
    """
    choice = choose_accel(requested, probe_host())
    runs, missing = [], []
    for arch in ARCHES.values():
        binary = (binaries or {}).get(arch.family, arch.qemu_binary) if not arch.x86 else arch.qemu_binary
        lacking = [arch.qemu_package] if shutil.which(binary) is None else []
        lacking += [arch.firmware_package] if missing_firmware(arch) else []
        if lacking:
            missing.append((arch.debian, lacking))
        else:
            runs.append(f"{arch.debian} ({guest_accel(choice, is_native(arch), arch.uname).accel})")
    checks = [Check(OK, "architectures", "guests of " + (", ".join(runs) or "no architecture"))]
    failing = [(name, lacking) for name, lacking in missing if needed is None or name in needed]
    others = [(name, lacking) for name, lacking in missing if needed is not None and name not in needed]
    for status, chosen, tail in ((FAIL, failing, ""), (INFO, others, " (not needed for the images checked)")):
        if chosen:
            packages = " ".join(sorted({package for _, lacking in chosen for package in lacking}))
            which = ", ".join(name for name, _ in chosen)
            checks.append(Check(status, "architectures", f"cannot run {which} guests: apt install {packages}{tail}"))
    return checks


def check_accel(requested: str) -> Check:
    choice = choose_accel(requested, probe_host())
    if choice.accel == "kvm":
        return Check(OK, "accel", f"{requested} -> kvm")
    return Check(
        OK, "accel",
        f"{requested} -> tcg ({choice.reason}); expect a cold boot of 20-40 s once per image and config, "
        "a warm start under 1 s and a revert of a few tenths of a second on a 2-core machine",
    )


def image_tool_needs(rootless: bool, images: Sequence[str] | None = None,
                     image_dirs: Sequence[Path] = (BUILTIN_IMAGES_DIR,)) -> dict[str, tuple[str, list[str]]]:
    """Each host program building ``images`` runs (None: every recipe): (its Debian package, the recipes needing it)."""
    from .images.builder import host_tools
    from .images.catalog import available_recipes, load_recipe

    known = available_recipes(image_dirs)
    names = sorted(known) if images is None else [name for name in images if name in known]
    needs: dict[str, tuple[str, list[str]]] = {}
    for name in names:
        for tool, package in host_tools(load_recipe(name, image_dirs), rootless).items():
            needs.setdefault(tool, (package, []))[1].append(name)
    return needs


def recipe_images(images: Sequence[str], image_dirs: Sequence[Path] = (BUILTIN_IMAGES_DIR,)) -> list[str]:
    """The recipe names among ``images`` (your own cloud images are not built here)."""
    return [name for name in dict.fromkeys(images) if not is_byo(name)]


def is_cached(cache_dir: Path, name: str, image_dirs: Sequence[Path] = (BUILTIN_IMAGES_DIR,)) -> bool:
    """Whether the current recipe ``name`` is built in ``cache_dir`` (so its build tools are not needed)."""
    from .errors import VMError
    from .images.cache import image_key
    from .images.catalog import load_recipe

    try:
        key = image_key(name, load_recipe(name, image_dirs).digest)
    except (VMError, KeyError):
        return False
    return (cache_dir / "images" / key / "manifest.json").is_file()


def check_image_tools(cache_dir: Path, versions: bool = True, images: Sequence[str] = (DEFAULT_IMAGE,),
                      image_dirs: Sequence[Path] = (BUILTIN_IMAGES_DIR,)) -> list[Check]:
    """The tools that build ``images``: missing is a failure unless the image is cached; other recipes' are information."""
    from .images.tools import have_tool

    rootless = os.geteuid() != 0
    selected = recipe_images(images, image_dirs)
    uncached = [name for name in selected if not is_cached(cache_dir, name, image_dirs)]
    needs = image_tool_needs(rootless, selected, image_dirs)
    missing = {tool: need for tool, need in needs.items() if not have_tool(tool)}
    checks = []
    if missing:
        status = FAIL if any(name in uncached for _, names in missing.values() for name in names) else WARN
        checks.append(Check(status, "image build", _missing_tools(missing) + ("" if status == FAIL else " (cached images still work)")))
    elif selected:
        found = _version(["mmdebstrap", "--version"]) if versions else None
        checks.append(Check(OK, "image build", f"tools for {', '.join(selected)}: {found or 'present'}"))
    others = {tool: need for tool, need in image_tool_needs(rootless, None, image_dirs).items()
              if tool not in needs and not have_tool(tool)}
    if others:
        checks.append(Check(INFO, "other images", _missing_tools(others) + " (not needed for the images checked)"))
    if rootless and uncached:
        checks += _check_rootless()
    return checks


def _missing_tools(missing: dict[str, tuple[str, list[str]]]) -> str:
    packages = sorted({package for package, _ in missing.values()})
    by_tool = "; ".join(f"{tool} (for {', '.join(names)})" for tool, (_, names) in missing.items())
    return f"missing {by_tool}: apt install {' '.join(packages)}"


def _check_rootless() -> list[Check]:
    user = os.environ.get("USER") or str(os.geteuid())
    try:
        has_subuid = any(line.split(":")[0] in (user, str(os.geteuid())) for line in Path("/etc/subuid").read_text().splitlines())
    except OSError:
        has_subuid = False
    if not has_subuid:
        return [Check(FAIL, "rootless build", f"no /etc/subuid entry for {user}: sudo usermod --add-subuids 100000-165535 "
                      f"--add-subgids 100000-165535 {user}")]
    if shutil.which("newuidmap") is None:
        return [Check(FAIL, "rootless build", "newuidmap not found: apt install uidmap")]
    return []


def check_cache(cache_dir: Path) -> Check:
    probe = cache_dir if cache_dir.exists() else next((p for p in cache_dir.parents if p.exists()), Path("/"))
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        return Check(FAIL, "cache", f"{cache_dir} is not writable: pass --vm-cache=DIR or fix its permissions")
    free = shutil.disk_usage(probe).free / 2**30
    if free < MIN_FREE_GIB:
        return Check(WARN, "cache", f"{cache_dir}: only {free:.1f} GiB free; an image and its states take about 1 GiB")
    return Check(OK, "cache", f"{cache_dir}: {free:.0f} GiB free")


def check_stale(cache_dir: Path) -> Check:
    stale = []
    run = cache_dir / "run"
    for session in sorted(run.iterdir()) if run.is_dir() else []:
        try:
            meta = json.loads((session / "session.json").read_text())
        except (OSError, ValueError):
            continue
        held = session_lock_held(session)
        if not (held if held is not None else pid_alive(int(meta.get("pid", 0)), meta.get("start_time"))):
            stale.append(session.name)
    if stale:
        return Check(WARN, "stale guests", f"{len(stale)} session(s) of dead pytest runs; the next run reaps them")
    return Check(OK, "stale guests", "none")


LIBVIRT_KVM = "libvirt kvm"
LIBVIRT_QEMU_CONF = Path("/etc/libvirt/qemu.conf")
DEFAULT_LIBVIRT_QEMU_USER = "libvirt-qemu"  # Debian's build of libvirt; qemu.conf's ``user`` overrides it
KVM_FIX = "as root: chgrp kvm /dev/kvm && chmod 0660 /dev/kvm (what Debian's udev rule does)"


def libvirt_qemu_identity(conf: Path = LIBVIRT_QEMU_CONF) -> tuple[str, int, frozenset[int]] | None:
    """(name, uid, groups) libvirt's QEMU processes run as, or None if that user does not exist here.

    qemu.conf is usually readable by root only; elsewhere Debian's default user is assumed.
    """
    try:
        text = conf.read_text()
    except OSError:
        text = ""
    values = dict(re.findall(r'^\s*(user|group)\s*=\s*"([^"]*)"', text, re.MULTILINE))
    name = values.get("user", DEFAULT_LIBVIRT_QEMU_USER)
    try:
        entry = pwd.getpwuid(number) if (number := _qemu_conf_id(name)) is not None else pwd.getpwnam(name)
    except KeyError:
        return None
    groups = set(os.getgrouplist(entry.pw_name, entry.pw_gid))
    if "group" in values:
        group = values["group"]
        with contextlib.suppress(KeyError):
            groups.add(number if (number := _qemu_conf_id(group)) is not None else grp.getgrnam(group).gr_gid)
    return entry.pw_name, entry.pw_uid, frozenset(groups)


def _qemu_conf_id(value: str) -> int | None:
    """qemu.conf names a user or group, or gives its number as ``+N`` (or a bare number)."""
    digits = value.removeprefix("+")
    return int(digits) if digits.isdigit() else None


def can_read_write(node: os.stat_result, uid: int, groups: frozenset[int]) -> bool:
    """Whether ``uid`` with ``groups`` may open ``node`` read-write, by its mode bits as the kernel checks them."""
    if uid == 0:
        return True
    if uid == node.st_uid:
        bits = stat.S_IRUSR | stat.S_IWUSR
    elif node.st_gid in groups:
        bits = stat.S_IRGRP | stat.S_IWGRP
    else:
        bits = stat.S_IROTH | stat.S_IWOTH
    return node.st_mode & bits == bits


def libvirt_kvm_problem(node: os.stat_result | None, identity: tuple[str, int, frozenset[int]] | None) -> str | None:
    """Why libvirt's QEMU capability cache will not hold, or None.

    libvirtd probes QEMU as root, so it sees KVM; when the QEMU user then cannot open /dev/kvm,
    libvirt finds KVM "not available now", drops the cache, and probes again for the next domain.
    """
    if node is None or not stat.S_ISCHR(node.st_mode) or identity is None:
        return None
    name, uid, groups = identity
    if can_read_write(node, uid, groups):
        return None
    try:
        owner, group = pwd.getpwuid(node.st_uid).pw_name, grp.getgrgid(node.st_gid).gr_name
    except KeyError:
        owner, group = str(node.st_uid), str(node.st_gid)
    return (f"libvirt re-probes QEMU on every guest: about a minute each (libvirt's QEMU user {name} cannot open "
            f"/dev/kvm, {stat.filemode(node.st_mode)} {owner}:{group}, but libvirtd as root can); fix {KVM_FIX}")


def is_local_system(uri: str) -> bool:
    """A URI for this machine's system libvirtd (the one whose QEMU user and /dev/kvm are ours to check)."""
    return uri.split("?")[0].rstrip("/") in ("qemu:///system", "qemu+unix:///system")


def check_libvirt_kvm(device: Path = Path("/dev/kvm"), conf: Path = LIBVIRT_QEMU_CONF) -> Check | None:
    try:
        node = device.stat()
    except OSError:
        return None
    identity = libvirt_qemu_identity(conf)
    problem = libvirt_kvm_problem(node, identity)
    if problem:
        return Check(WARN, LIBVIRT_KVM, problem)
    if identity is None or not stat.S_ISCHR(node.st_mode):
        return None
    return Check(OK, LIBVIRT_KVM, f"libvirt's QEMU user {identity[0]} can open /dev/kvm: its capability cache holds")


def check_libvirt(uris: Sequence[str], pool: str = DEFAULT_LIBVIRT_POOL) -> list[Check]:
    """Each URI answers; a remote host (not a unix socket here) also has the storage pool for copies."""
    if not uris:
        return []
    from .backends.libvirt import shares_files

    try:
        import libvirt  # type: ignore[import-untyped]
    except ImportError:
        return [Check(FAIL, "libvirt", "libvirt-python not installed: pip install 'pytest-vmfixtures[libvirt]'")]
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors arrive as exceptions, told in one line
    checks = []
    for uri in uris:
        try:
            conn = libvirt.open(uri)
            version = int(conn.getLibVersion())
            checks.append(Check(OK, "libvirt", f"{uri}: libvirt {version // 1000000}.{version // 1000 % 1000}.{version % 1000}"))
            if not shares_files(uri):
                checks.append(_check_pool(conn, uri, pool))
            conn.close()
        except libvirt.libvirtError as exc:
            checks.append(Check(FAIL, "libvirt", f"{uri} unreachable ({exc.get_error_message()}); start libvirtd or fix the URI"))
    return checks


def check_libvirt_network(uris: Sequence[str], network: str) -> list[Check]:
    """Snapshot mode: each host has ``network``, active; this machine's libvirt has dnsmasq to serve its DHCP."""
    if not uris:
        return []
    try:
        import libvirt
    except ImportError:
        return []  # check_libvirt says so
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors arrive as exceptions, told in one line
    from .backends.libvirt.network import network_problem

    checks = []
    if any(is_local_system(uri) for uri in uris) and shutil.which("dnsmasq") is None:
        checks.append(Check(FAIL, "libvirt network", "libvirt's NAT networks need dnsmasq for DHCP: apt install dnsmasq-base"))
    for uri in uris:
        try:
            conn = libvirt.open(uri)
        except libvirt.libvirtError:
            continue  # check_libvirt says so
        try:
            problem = network_problem(conn, uri, network)
        finally:
            conn.close()
        checks.append(Check(FAIL, "libvirt network", problem) if problem else
                      Check(OK, "libvirt network", f"{uri}: network {network!r} is active (snapshot mode)"))
    return checks


def _check_pool(conn: object, uri: str, pool: str) -> Check:
    import libvirt

    from .backends.libvirt.storage import pool_setup

    try:
        active = conn.storagePoolLookupByName(pool).isActive()  # type: ignore[attr-defined]
    except libvirt.libvirtError:
        return Check(FAIL, "libvirt pool", f"{uri} has no storage pool {pool!r} for copied images; on that host: "
                     f"{pool_setup(pool)}")
    if not active:
        return Check(FAIL, "libvirt pool", f"{uri}: storage pool {pool!r} is not active: virsh pool-start {pool}")
    return Check(OK, "libvirt pool", f"{uri}: storage pool {pool!r} (remote host: images are copied there)")


def image_arches(images: Sequence[str], image_dirs: Sequence[Path] = (BUILTIN_IMAGES_DIR,)) -> list[str]:
    """The Debian architectures of the recipes among ``images`` (your own cloud images are x86)."""
    from .errors import VMError
    from .images.catalog import load_recipe

    arches = {"amd64"}
    for name in recipe_images(images, image_dirs):
        try:
            arches.add(load_recipe(name, image_dirs).architecture)
        except (VMError, KeyError):
            continue  # an unknown or broken recipe is reported where it is used
    return sorted(arches)


def check_report_browser() -> Check:
    """Chromium and its driver: optional, only for the check that an HTML report shows a guest's screen."""
    missing = [tool for tool in ("chromium", "chromedriver") if shutil.which(tool) is None]
    if missing:
        return Check(INFO, "report browser", f"{' and '.join(missing)} not found; optional, only to check that pytest-html "
                     "reports show guest screens (Debian: apt install chromium chromium-driver)")
    return Check(INFO, "report browser", "chromium and chromedriver found (optional: the HTML report check)")


def run_checks(cache_dir: Path, accel: str = "auto", qemu_binary: str = "qemu-system-x86_64",
               libvirt_uris: Sequence[str] = (), versions: bool = True, libvirt_pool: str = DEFAULT_LIBVIRT_POOL,
               local_libvirt: bool = False, libvirt_network: str | None = None,
               images: Sequence[str] = (DEFAULT_IMAGE,), image_dirs: Sequence[Path] = (BUILTIN_IMAGES_DIR,),
               backend: str = "qemu", qemu_binaries: dict[str, str] | None = None) -> list[Check]:
    """What running guests of ``images`` on ``backend`` needs of this host, one check a line.

    ``versions=False`` skips running the tools to ask their versions (the pytest header's quick check).
    ``libvirt_network``: the libvirt backend's snapshot mode, whose guests are reached on that network.
    ``local_libvirt`` checks this machine's libvirt QEMU user against /dev/kvm even when no URI is given
    (the doctor command does; the header only when a URI is this machine's system libvirtd).
    """
    kvm = check_libvirt_kvm() if local_libvirt or any(is_local_system(uri) for uri in libvirt_uris) else None
    return [
        check_qemu(qemu_binary, versions, backend),
        check_kvm(),
        check_accel(accel),
        *check_arches(accel, image_arches(images, image_dirs), qemu_binaries),
        *check_image_tools(cache_dir, versions, images, image_dirs),
        check_cache(cache_dir),
        check_stale(cache_dir),
        *check_libvirt(libvirt_uris, libvirt_pool),
        *(check_libvirt_network(libvirt_uris, libvirt_network) if libvirt_network is not None else []),
        *([kvm] if kvm else []),
        check_report_browser(),
    ]


def summary(checks: Sequence[Check]) -> str:
    failed = [c for c in checks if c.status == FAIL]
    warned = [c for c in checks if c.status == WARN]
    if failed:
        return f"host check: {len(failed)} problem(s) ({', '.join(c.name for c in failed)}); run pytest-vmfixtures doctor"
    if warned:
        return f"host check: usable, {len(warned)} warning(s) ({', '.join(c.name for c in warned)})"
    return "host check: all fine"
