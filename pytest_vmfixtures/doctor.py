"""``pytest-vmfixtures doctor``: can this host run guests, and how fast?

Each check gives one line: ``ok``, ``warn`` (works, but slower or riskier
than it could be) or ``fail`` (a needed thing is missing), with what to do.
The pytest header shows the same verdict in one line.
"""

from __future__ import annotations

import grp
import json
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .accel import choose_accel, kvm_problem, probe_host
from .options import DEFAULT_LIBVIRT_POOL
from .runtime import pid_alive

OK, WARN, FAIL = "ok", "warn", "fail"
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


def check_qemu(binary: str, versions: bool = True) -> Check:
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


def check_accel(requested: str) -> Check:
    choice = choose_accel(requested, probe_host())
    if choice.accel == "kvm":
        return Check(OK, "accel", f"{requested} -> kvm")
    return Check(
        OK, "accel",
        f"{requested} -> tcg ({choice.reason}); expect a cold boot of 20-40 s once per image and config, "
        "a warm start under 1 s and a revert of a few tenths of a second on a 2-core machine",
    )


def check_image_tools(cache_dir: Path, versions: bool = True) -> list[Check]:
    cached = any(cache_dir.glob("images/*/manifest.json"))
    checks = []
    missing = [t for t in ("mmdebstrap", "genext2fs", "resize2fs", "tune2fs") if shutil.which(t) is None]
    if missing:
        status = WARN if cached else FAIL
        checks.append(Check(status, "image build", f"missing {', '.join(missing)}: apt install mmdebstrap genext2fs e2fsprogs"
                            + (" (cached images still work)" if cached else "")))
    else:
        found = _version(["mmdebstrap", "--version"]) if versions else None
        checks.append(Check(OK, "image build", found or "mmdebstrap present"))
    if os.geteuid() != 0:
        user = os.environ.get("USER") or str(os.geteuid())
        try:
            has_subuid = any(line.split(":")[0] in (user, str(os.geteuid())) for line in Path("/etc/subuid").read_text().splitlines())
        except OSError:
            has_subuid = False
        if not has_subuid:
            checks.append(Check(FAIL if not cached else WARN, "rootless build",
                                f"no /etc/subuid entry for {user}: sudo usermod --add-subuids 100000-165535 "
                                f"--add-subgids 100000-165535 {user}"))
        elif shutil.which("newuidmap") is None:
            checks.append(Check(FAIL, "rootless build", "newuidmap not found: apt install uidmap"))
    return checks


def check_cache(cache_dir: Path) -> Check:
    probe = cache_dir if cache_dir.exists() else next((p for p in cache_dir.parents if p.exists()), Path("/"))
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        return Check(FAIL, "cache", f"{cache_dir} is not writable: pass --vm-cache DIR or fix its permissions")
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
        if not pid_alive(int(meta.get("pid", 0)), meta.get("start_time")):
            stale.append(session.name)
    if stale:
        return Check(WARN, "stale guests", f"{len(stale)} session(s) of dead pytest runs; the next run reaps them")
    return Check(OK, "stale guests", "none")


def check_libvirt(uris: Sequence[str], pool: str = DEFAULT_LIBVIRT_POOL) -> list[Check]:
    """Each URI answers; a remote host (not a unix socket here) also has the storage pool for copies."""
    if not uris:
        return []
    from .backends.libvirt import shares_files

    try:
        import libvirt  # type: ignore[import-untyped]
    except ImportError:
        return [Check(FAIL, "libvirt", "libvirt-python not installed: pip install 'pytest-vmfixtures[libvirt]'")]
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


def _check_pool(conn: object, uri: str, pool: str) -> Check:
    import libvirt

    from .backends.libvirt_storage import pool_setup

    try:
        active = conn.storagePoolLookupByName(pool).isActive()  # type: ignore[attr-defined]
    except libvirt.libvirtError:
        return Check(FAIL, "libvirt pool", f"{uri} has no storage pool {pool!r} for copied images; on that host: "
                     f"{pool_setup(pool)}")
    if not active:
        return Check(FAIL, "libvirt pool", f"{uri}: storage pool {pool!r} is not active: virsh pool-start {pool}")
    return Check(OK, "libvirt pool", f"{uri}: storage pool {pool!r} (remote host: images are copied there)")


def run_checks(cache_dir: Path, accel: str = "auto", qemu_binary: str = "qemu-system-x86_64",
               libvirt_uris: Sequence[str] = (), versions: bool = True, libvirt_pool: str = DEFAULT_LIBVIRT_POOL) -> list[Check]:
    """``versions=False`` skips running the tools to ask their versions (the pytest header's quick check)."""
    return [
        check_qemu(qemu_binary, versions),
        check_kvm(),
        check_accel(accel),
        *check_image_tools(cache_dir, versions),
        check_cache(cache_dir),
        check_stale(cache_dir),
        *check_libvirt(libvirt_uris, libvirt_pool),
    ]


def summary(checks: Sequence[Check]) -> str:
    failed = [c for c in checks if c.status == FAIL]
    warned = [c for c in checks if c.status == WARN]
    if failed:
        return f"host check: {len(failed)} problem(s) ({', '.join(c.name for c in failed)}); run pytest-vmfixtures doctor"
    if warned:
        return f"host check: usable, {len(warned)} warning(s) ({', '.join(c.name for c in warned)})"
    return "host check: all fine"
