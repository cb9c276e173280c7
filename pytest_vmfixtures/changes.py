"""``vm.changes()``: what a test changed in the guest since the clean state it was handed.

A *baseline* is taken once, when a clean state is made (``pool``, after provisioning, before the state is
saved): a listing of every path on the guest's local disk filesystems (type, permissions, owner, size,
times, link target), content hashes and the installed packages. It is kept in a tmpfs inside the guest
(``/run``, else ``/dev/shm`` or ``/dev``), so it is part of the saved RAM: every restore and every revert
brings it back at no cost, and it never touches the guest's disk.

Where the guest has perl and GNU find, the baseline also starts a watcher (``changes_watch.pl``, inotify on
every directory it listed) that stays in the saved RAM and notes which paths a test touches (all a test that
never asks pays: the kernel tells it of each change). ``vm.changes()`` then runs one POSIX sh script in the
guest. Where the watcher runs and lost nothing, the script starts one perl program (``changes_diff.pl``)
that brings the watcher's notes up to date and compares only the noted paths (and all below directories
made, moved or removed) with the baseline: under emulation every program a script starts costs a tenth of a
second or more, so it is one program. Otherwise the script lists the filesystems again and compares with
awk. Only the differences cross to the host. Timestamps alone are not a change: a file whose size, type,
permissions, owner and link target are equal but whose times moved is compared by content. Content hashes
come from the baseline (every regular file up to 1 MiB outside /usr, where the guest's package manager keeps
none) and from dpkg's own ``md5sums`` of package files, copied at baseline time; a file with no hash (a file
over 1 MiB outside /usr, say) whose times moved counts as modified. The scripts need only sh, find, awk and
md5sum, from coreutils or busybox (the watcher and its comparison: perl-base).
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import shlex
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources

from .command import CommandResult
from .errors import GuestError, VMError

log = logging.getLogger("pytest_vmfixtures")

# (pattern, why); a path is left out when it or one of its parent directories matches a pattern.
# Pseudo and volatile filesystems (proc, sysfs, devtmpfs, tmpfs: /proc, /sys, /dev, /run, and /tmp where it
# is a tmpfs) are never scanned at all: only local disk filesystems are (LOCAL_FS below).
DEFAULT_IGNORE: tuple[tuple[str, str], ...] = (
    ("/tmp", "temporary files"),
    ("/var/tmp", "temporary files"),
    ("/var/log", "logs (the plugin's SSH logins write lastlog and wtmp there)"),
    ("/var/cache", "caches: apt's downloaded .debs, man-db's index, ldconfig's aux-cache"),
    ("/var/backups", "the daily copies of the package database"),
    ("/var/lib/dpkg", "the package manager's own bookkeeping (packages are reported from it instead)"),
    ("/var/lib/apt", "the package manager's own bookkeeping"),
    ("/var/lib/ucf", "the configuration-file registry packages update on install and purge"),
    ("/var/lib/rpm", "the package manager's own bookkeeping"),
    ("/var/lib/dnf", "the package manager's own bookkeeping"),
    ("/var/lib/yum", "the package manager's own bookkeeping"),
    ("/lib/apk/db", "the package manager's own bookkeeping"),
    ("/var/lib/systemd", "timer stamps, the random seed and other state systemd keeps while running"),
    ("/var/lib/dhcp", "DHCP leases, renewed while the guest runs"),
    ("/var/lib/dhcpcd", "DHCP leases, renewed while the guest runs"),
    ("/var/lib/sudo", "sudo's per-user lecture marks: the plugin's commands run through sudo on some images"),
    ("/var/lib/logrotate", "logrotate's state"),
)
# Left out when the results are compared, not by the guest script (whose text is in every saved state's key):
# what the plugin itself has a guest write after each restore.
PLUGIN_WRITES: tuple[tuple[str, str], ...] = (
    ("/etc/adjtime", "the hardware clock's drift file: on a guest without GNU date the plugin sets the clock after "
                     "each restore with the agent's guest-set-time, whose `hwclock -w` writes it"),
)
LOCAL_FS = ("ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "jfs", "reiserfs", "vfat", "exfat", "zfs", "bcachefs", "nilfs2")
HASH_LIMIT = 1 << 20  # files up to this size get a content hash at baseline (outside /usr where dpkg has them)
BASELINE_DIRS = ("/run", "/dev/shm", "/dev")  # tmpfs where the baseline may live, first that is one
BASELINE_NAME = "vmfx-changes"
BASELINE_TIMEOUT = 600.0
END = "VMFX-CHANGES-END"
WALKED = "VMFX-LISTED-ALL"  # the comparison listed every path: no watcher, or it lost events


def default_patterns() -> tuple[str, ...]:
    return tuple(pattern for pattern, _why in DEFAULT_IGNORE + PLUGIN_WRITES)


def check_patterns(patterns: object, where: str) -> tuple[str, ...]:
    """``patterns`` as a tuple of absolute glob patterns; ValueError naming the first bad one.

    A single string is one pattern.
    """
    if isinstance(patterns, str):
        patterns = (patterns,)
    if not isinstance(patterns, Iterable):
        raise ValueError(f"{where}: expected a list of absolute glob patterns such as '/opt/app/*', got {patterns!r}")
    checked = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"{where}: pattern {pattern!r} is not a string; give absolute glob patterns such as '/opt/app/*'")
        if not pattern.startswith("/"):
            raise ValueError(f"{where}: pattern {pattern!r} is not an absolute glob; start it with '/', as in '/opt/app/*'")
        checked.append(pattern)
    return tuple(checked)


def ignored(path: str, patterns: Iterable[str]) -> bool:
    """Whether ``path`` or one of its parent directories matches one of ``patterns`` (fnmatch: ``*`` also matches ``/``)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(2, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(p, pattern) for pattern in patterns for p in prefixes)


@dataclass(frozen=True)
class PackageChanges:
    """Package names, sorted lists: installed, removed (purged or removed), or at another version."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.modified)


@dataclass(frozen=True)
class Changes:
    """What a test changed in the guest's filesystems since its clean state (see ``VM.changes``).

    ``added``, ``modified`` and ``removed`` are sorted lists of absolute paths, directories included.
    """

    added: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    packages: PackageChanges = field(default_factory=PackageChanges)

    def __bool__(self) -> bool:
        return bool(self.added or self.modified or self.removed or self.packages)

    def lines(self) -> list[str]:
        marked = [(p, "A") for p in self.added] + [(p, "C") for p in self.modified] + [(p, "D") for p in self.removed]
        out = [f"{mark} {path}" for path, mark in sorted(marked)]
        out += [f"package added: {p}" for p in self.packages.added]
        out += [f"package removed: {p}" for p in self.packages.removed]
        out += [f"package version changed: {p}" for p in self.packages.modified]
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines()) if self else "no changes"


# -- the guest side ------------------------------------------------------------
# POSIX sh + find/stat/awk/md5sum from coreutils, findutils and mawk/gawk, or all from busybox. The awk
# programs contain no single quote (they sit inside single quotes). Listing format, one line per path,
# tab-separated: path type mode uid gid size mtime ctime link-target. SKIP: directories not descended into
# (plain paths: the defaults' that have no glob), so what lies below them is neither listed nor hashed.
# TZ is set: without it glibc's localtime, behind find's %Ts and %Cs, stats /etc/localtime once per path,
# which made the listing 4-6 times slower under emulation (the seconds it prints do not depend on TZ).

_TOOLS = r"""
PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH
TZ=UTC; export TZ
SKIP="{skip}"
BB=; command -v busybox >/dev/null 2>&1 && BB=busybox
for t in awk cat cmp grep sort xargs md5sum mkdir rm; do
  command -v $t >/dev/null 2>&1 || { [ -n "$BB" ] && eval "$t() { busybox $t \"\$@\"; }"; }
done
MD5=md5sum; command -v md5sum >/dev/null 2>&1 || MD5="$BB md5sum"
for t in awk md5sum xargs; do
  command -v $t >/dev/null 2>&1 || [ -n "$BB" ] || { echo "VMFX-ERROR the guest has no $t (and no busybox) any more"; exit 0; }
done
X=; for s in $SKIP; do X="$X -path $s -prune -o"; done
FMT='%p\t%y\t%m\t%U\t%G\t%s\t%Ts\t%Cs\t%l\n'
export X FMT
vmfx_list() {
  if find / -maxdepth 0 -printf '' >/dev/null 2>&1; then
    find "$@" -xdev $X -printf "$FMT" 2>/dev/null
  elif [ -n "$BB" ]; then
    busybox find "$@" -xdev $X -exec busybox stat -c '%f	%u	%g	%s	%Y	%Z	%N' {} + 2>/dev/null | awk -F'\t' '
      function hex(s,  i, n) { n = 0; s = tolower(s)
        for (i = 1; i <= length(s); i++) n = n * 16 + index("0123456789abcdef", substr(s, i, 1)) - 1
        return n }
      { m = hex($1); t = int(m / 4096)
        ty = t == 8 ? "f" : t == 4 ? "d" : t == 10 ? "l" : t == 2 ? "c" : t == 6 ? "b" : t == 1 ? "p" : t == 12 ? "s" : "U"
        name = $7; for (i = 8; i <= NF; i++) name = name "\t" $i
        target = ""
        if (ty == "l") { k = index(name, "\047 -> \047"); target = substr(name, k + 6, length(name) - k - 6)
          name = substr(name, 2, k - 2) }
        printf "%s\t%s\t%o\t%s\t%s\t%s\t%s\t%s\t%s\n", name, ty, m % 4096, $2, $3, $4, $5, $6, target }'
  else
    echo "VMFX-ERROR the guest has no find that can list files any more (and no busybox)"
  fi
}
vmfx_pkgdb() {
  find /var/lib/dpkg/status /lib/apk/db/installed /var/lib/rpm /usr/lib/sysimage/rpm -maxdepth 1 \
    -printf '%p %i %s %T@ %C@\n' 2>/dev/null
}
vmfx_pkgs() {
  if [ -f /var/lib/dpkg/status ]; then
    awk '/^Package:/ { p = $2 } /^Version:/ { v = $2 } /^Status:/ { s = $4 }
      /^$/ { if (p != "" && s != "not-installed" && s != "config-files") print p "\t" v; p = v = s = "" }
      END { if (p != "" && s != "not-installed" && s != "config-files") print p "\t" v }' /var/lib/dpkg/status
  elif [ -f /lib/apk/db/installed ]; then
    awk '/^P:/ { p = substr($0, 3) } /^V:/ { v = substr($0, 3) } /^$/ { if (p != "") print p "\t" v; p = "" }
      END { if (p != "") print p "\t" v }' /lib/apk/db/installed
  elif command -v rpm >/dev/null 2>&1; then
    rpm -qa --qf '%{NAME}\t%{EPOCHNUM}:%{VERSION}-%{RELEASE}\n' 2>/dev/null
  fi
}
"""

_BASELINE = r"""
umask 077
B=
for d in {dirs}; do
  if {in_ram}
  then B=$d/{name}; break; fi
done
[ -n "$B" ] || {{ echo "VMFX-ERROR no tmpfs at {dirs} to keep the baseline in"; exit 1; }}
rm -rf "$B" && mkdir -p "$B" || exit 1
{mounts} > "$B/mounts"
vmfx_list $(cat "$B/mounts") > "$B/files"
vmfx_pkgs > "$B/pkgs"
ALL=1
{{
  if ls {dpkg_info}/*.md5sums >/dev/null 2>&1; then
    ALL=0
    cat {dpkg_info}/*.md5sums | awk '{{ p = substr($0, 35); print substr($0, 1, 32) "  /" p
      if (p ~ /^(bin|sbin|lib|lib32|lib64|libx32)\//) print substr($0, 1, 32) "  /usr/" p }}'
  fi
  awk -F'\t' -v all=$ALL '$2 == "f" && $6 <= {limit} && (all || $1 !~ /^\/usr\//) {{ printf "%s%c", $1, 0 }}' \
    "$B/files" | xargs -0 -r $MD5
}} > "$B/hashes" 2>/dev/null
vmfx_pkgdb > "$B/pkgdb"
WATCH=", not watching (no perl, or no find with -printf)"
if command -v perl >/dev/null 2>&1 && find / -maxdepth 0 -printf '' >/dev/null 2>&1; then
  W=$B/watch
  mkdir "$W" && awk -F'\t' '$2 == "d" {{ print $1 }}' "$B/files" > "$W/dirs" && cat > "$W/watch.pl" <<'VMFX-WATCH'
@WATCHER@VMFX-WATCH
  S=; command -v setsid >/dev/null 2>&1 && S=setsid
  $S perl "$W/watch.pl" "$(uname -m)" "$W" </dev/null >/dev/null 2>&1 &
  P=$! i=0
  while [ ! -f "$W/ready" ] && [ $i -lt 600 ] && kill -0 $P 2>/dev/null; do sleep 0.1; i=$((i + 1)); done
  if [ -f "$W/ready" ]; then WATCH=", watching $(wc -l < "$W/dirs") directories"
  else WATCH=", not watching ($(cut -f2 "$W/log" 2>/dev/null | head -n 1))"; fi
fi
touch "$B/ok" 2>/dev/null || : > "$B/ok"
echo "$B $(wc -l < "$B/files") paths$WATCH"
"""

_IN_RAM = """awk -v d="$d" '$2 == d && ($3 == "tmpfs" || $3 == "devtmpfs" || $3 == "ramfs") { f = 1 } END { exit !f }' /proc/mounts"""
_MOUNTS = "awk '$3 ~ /^(" + "|".join(LOCAL_FS) + ")$/ { print $2 }' /proc/mounts | sort -u"


def _tools(skip: Iterable[str] | None) -> str:
    paths = _prefixes() if skip is None else tuple(skip)
    if any(c in p for p in paths for c in " \t\n*?[\"$`\\"):
        raise ValueError(f"directories to skip must be plain paths: {paths}")
    return _TOOLS.replace("{skip}", " ".join(paths))


def _prefixes() -> tuple[str, ...]:
    """The default patterns that are plain paths: what lies below them is neither hashed nor compared."""
    return tuple(p for p, _why in DEFAULT_IGNORE if not any(c in p for c in "*?["))


def baseline_script(dirs: Iterable[str] = BASELINE_DIRS, roots: Iterable[str] | None = None,
                    skip: Iterable[str] | None = None) -> str:
    """The baseline script; ``roots`` (the tests' own, on the host): scan these directories rather than the
    local filesystems, and keep the baseline in the first of ``dirs`` whether or not it is a tmpfs.
    ``skip``: directories not descended into (None: the default patterns that are plain paths)."""
    return _tools(skip) + _BASELINE.format(
        dirs=" ".join(dirs), name=BASELINE_NAME, limit=HASH_LIMIT,
        in_ram=_IN_RAM if roots is None else "true",
        dpkg_info="/var/lib/dpkg/info" if roots is None else "/nonexistent",
        mounts=_MOUNTS if roots is None else "printf '%s\\n' " + " ".join(shlex.quote(r) for r in roots),
    ).replace("@WATCHER@", _program("changes_watch.pl", "VMFX-WATCH"))


def _program(name: str, end: str) -> str:
    """A perl program shipped beside this module, for a here-document that ``end`` ends."""
    source = resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
    if f"\n{end}\n" in "\n" + source:
        raise ValueError(f"{name} holds its here-document's end, {end}")
    return source


def diff_script(dirs: Iterable[str] = BASELINE_DIRS, skip: Iterable[str] | None = None) -> str:
    """The comparison; ``skip`` as for :func:`baseline_script` (both must skip the same)."""
    return _tools(skip) + _DIFF.format(dirs=" ".join(dirs), name=BASELINE_NAME, end=END, walked=WALKED).replace(
        "@DIFF@", _program("changes_diff.pl", "VMFX-DIFF"))


BASELINE_SCRIPT = baseline_script()
BASELINE_DIGEST = hashlib.sha256(BASELINE_SCRIPT.encode()).hexdigest()[:16]  # part of every saved state's key

_DIFF = r"""
B=
for d in {dirs}; do [ -f "$d/{name}/ok" ] && {{ B=$d/{name}; break; }}; done
if [ -z "$B" ]; then
  [ -d /proc/1 ] || {{ echo "VMFX-ERROR /proc is not mounted"; exit 0; }}
  echo "VMFX-NOBASELINE"; exit 0
fi
T=$B/tmp.$$
if [ -f "$B/watch/ready" ] && command -v perl >/dev/null 2>&1; then
  perl - "$B" {end} "$MD5" $SKIP <<'VMFX-DIFF' && exit 0
@DIFF@VMFX-DIFF
fi
echo {walked}
vmfx_list $(cat "$B/mounts") > "$T.list"
awk -F'\t' '
  {{ p = $1; m = $2 "\t" $3 "\t" $4 "\t" $5 "\t" ($2 == "f" ? $6 : "") "\t" $9 }}
  FILENAME == ARGV[1] {{ bm[p] = m; bt[p] = $7 "\t" $8; next }}
  /^VMFX-ERROR/ {{ print; next }}
  p in seen {{ next }}
  {{ seen[p] = 1
    if (!(p in bm)) print "A\t" p
    else if (m != bm[p]) print "C\t" p
    else if ($2 == "f" && $7 "\t" $8 != bt[p]) print "H\t" p }}
  END {{ for (p in bm) if (!(p in seen)) print "D\t" p }}' "$B/files" "$T.list" > "$T.diff"
if grep -q "^H" "$T.diff"; then
  awk -F'\t' '$1 == "H" {{ printf "%s%c", $2, 0 }}' "$T.diff" | xargs -0 -r $MD5 > "$T.now" 2>/dev/null
  awk -F'\t' '$1 == "H" {{ print "  " $2 }}' "$T.diff" > "$T.old"
  grep -F -f "$T.old" "$B/hashes" > "$T.now.old"; mv "$T.now.old" "$T.old"
  awk -F'\t' '
    FILENAME == ARGV[1] {{ now[substr($0, 35)] = substr($0, 1, 32); next }}
    FILENAME == ARGV[2] {{ p = substr($0, 35); if (p in now) old[p] = substr($0, 1, 32); next }}
    $1 == "H" {{ if (!($2 in old) || !($2 in now) || old[$2] != now[$2]) print "C\t" $2; next }}
    {{ print }}' "$T.now" "$T.old" "$T.diff"
else
  cat "$T.diff"
fi
vmfx_pkgs | awk -F'\t' '
    NR == FNR {{ v[$1] = $2; next }}
    {{ seen[$1] = 1; if (!($1 in v)) print "PA\t" $1; else if (v[$1] != $2) print "PC\t" $1 }}
    END {{ for (p in v) if (!(p in seen)) print "PD\t" p }}' "$B/pkgs" -
rm -f "$T.list" "$T.diff" "$T.now" "$T.old"
echo {end}
"""

DIFF_SCRIPT = diff_script()


def take_baseline(run: Callable[[str, float], CommandResult], label: str, progress: Callable[[str], None]) -> dict[str, object]:
    """Take the baseline in a guest about to be saved as clean; returns facts kept with the state.

    A guest where it cannot be taken still makes its state; vm.changes() then says it has no baseline.
    """
    started = time.monotonic()
    try:
        result = run(BASELINE_SCRIPT, BASELINE_TIMEOUT)
        if not result.ok or "VMFX-ERROR" in result.stdout:
            raise GuestError((result.stdout + result.stderr).strip()[:300])
    except VMError as exc:
        log.warning("%s: no baseline for vm.changes(): %s", label, exc)
        return {"changes_baseline": False}
    seconds = time.monotonic() - started
    progress(f"{label}: baseline for vm.changes() taken in {seconds:.1f} s ({result.stdout.strip()})")
    return {"changes_baseline": True, "changes_baseline_seconds": round(seconds, 2)}


def parse(name: str, result: CommandResult, patterns: Iterable[str]) -> Changes:
    """The diff script's output as Changes, with paths matching ``patterns`` left out."""
    out = result.stdout
    for line in out.splitlines():
        if line.startswith("VMFX-ERROR"):
            raise GuestError(f"{name}: vm.changes() cannot tell what changed: {line[len('VMFX-ERROR'):].strip()}")
    if "VMFX-NOBASELINE" in out:
        raise GuestError(f"{name}: vm.changes() has no baseline: the guest rebooted since its clean state, or the "
                         "state was made without one (it is taken when a clean state is made)")
    if END not in out:
        why = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        raise GuestError(f"{name}: vm.changes() cannot tell what changed: the guest's shell tools failed ({why})")
    found: dict[str, set[str]] = {kind: set() for kind in ("A", "C", "D", "PA", "PC", "PD")}
    patterns = tuple(patterns)
    for line in out.splitlines():
        kind, sep, path = line.partition("\t")
        if not sep or kind not in found:
            continue
        if kind.startswith("P") or not ignored(path, patterns):
            found[kind].add(path)
    return Changes(
        added=sorted(found["A"]),
        modified=sorted(found["C"]),
        removed=sorted(found["D"]),
        packages=PackageChanges(sorted(found["PA"]), sorted(found["PD"]), sorted(found["PC"])),
    )
