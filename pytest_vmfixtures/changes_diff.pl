# vm.changes()' comparison where the baseline's watcher runs (changes_watch.pl): one perl process lists only
# the paths the watcher noted and compares them with the baseline, instead of a shell pipeline listing
# every path (under emulation each program a script starts costs a tenth of a second or more).
# Arguments: BASELINE-DIR END-MARKER MD5-COMMAND SKIP-DIRECTORY...; prints the lines changes.parse reads,
# then END-MARKER. Exits 3, having printed nothing, where the watcher's notes cannot be trusted (it is
# not running, lost events, or does not answer): the caller then lists every path.
# No "use strict; use warnings": loading them costs a quarter of a second under emulation (measured:
# perl -e 1 0.36-0.51 s, with -Mstrict -Mwarnings 0.66-0.71 s). tests/unit/test_changes.py compiles this
# program with both, and fails on any warning.

my ($base, $end, $md5, @skip) = @ARGV;
my $watch = "$base/watch";
my %skip = map { $_ => 1 } @skip;
sub walk_instead { exit 3 }
sub slurp { my ($path) = @_; open(my $in, "<", $path) or return undef; local $/; my $text = <$in>; close $in; return $text }

my $pid = slurp("$watch/ready") // walk_instead();
chomp $pid;
(slurp("/proc/$pid/cmdline") // "") =~ /^vmfx-changes-watch/ or walk_instead();

# Bring the watcher's notes up to date: it answers a token written to DIR/flush once it has noted every
# event before it (one inotify queue keeps them in order).
my $token = join(".", $$, time, int(rand(1 << 30)));
open(my $flush, ">", "$watch/flush") or walk_instead();
print $flush "$token\n";
close $flush or walk_instead();
open(my $log, "<", "$watch/log") or walk_instead();
my (%noted, %below, @walk);  # P paths; R and D directories; R directories to list
my $flushed = 0;
for (my $waited = 0; !$flushed; $waited++) {
    while (defined(my $line = <$log>)) {
        if ($line !~ /\n\z/) { seek($log, -length $line, 1); last }  # still being written
        chomp $line;
        my ($kind, $path) = split /\t/, $line, 2;
        if ($kind eq "O") { walk_instead() }
        elsif ($kind eq "F") { $flushed = 1 if $path eq $token }
        elsif ($kind eq "P") { $noted{$path} = 1 }
        elsif ($kind eq "R" || $kind eq "D") { push @walk, $path if $kind eq "R"; $below{$path} = 1 }  # walk() lists each once
    }
    last if $flushed;
    walk_instead() if $waited > 500;
    select(undef, undef, undef, 0.01);
    seek($log, 0, 1);
}
close $log;

# What is there now: as the full listing's find -xdev -printf prints it (changes.py's FMT).
my %type = (0100000 => "f", 0040000 => "d", 0120000 => "l", 0020000 => "c", 0060000 => "b", 0010000 => "p", 0140000 => "s");
my %now;
sub entry {
    my ($path) = @_;
    my @st = lstat $path or return undef;
    my $type = $type{$st[2] & 0170000} // "U";
    my $target = $type eq "l" ? (readlink($path) // "") : "";
    $now{$path} = [$type, sprintf("%o", $st[2] & 07777), $st[4], $st[5], $st[7], $st[9], $st[10], $target];
    return \@st;
}
my %walked;
sub walk {
    my ($dir, $device) = @_;
    return if $walked{$dir}++;
    opendir(my $dh, $dir) or return;
    my @names = grep { $_ ne "." && $_ ne ".." } readdir $dh;
    closedir $dh;
    for my $name (@names) {
        my $path = $dir eq "/" ? "/$name" : "$dir/$name";
        next if $skip{$path};
        my $st = entry($path) or next;
        walk($path, $device) if ($st->[2] & 0170000) == 0040000 && $st->[0] == $device;
    }
}
for my $path (keys %noted) { entry($path) unless $skip{$path} }
for my $dir (@walk) {
    next if $skip{$dir};
    my $st = entry($dir) or next;
    walk($dir, $st->[0]) if ($st->[2] & 0170000) == 0040000;
}

# What the baseline had there. Few paths: looked up in the listing as a string (index() runs at C speed,
# and find lists what lies below a directory in one run); many: each line checked.
sub lines_at {  # the lines of $text that start with $start
    my ($text, $start, $all) = @_;
    my (@lines, $at);
    for ($at = index($text, "\n$start"); $at >= 0; $at = index($text, "\n$start", $at + 1)) {
        push @lines, substr($text, $at + 1, index($text, "\n", $at + 1) - $at - 1);
        last unless $all;
    }
    return @lines;
}
my $listing = "\n" . (slurp("$base/files") // walk_instead()) . "\n";
my @baseline;
if (keys(%noted) + keys(%below) <= 256) {
    @baseline = map { lines_at($listing, "$_\t", 0) } keys %noted, keys %below;
    push @baseline, map { lines_at($listing, "$_/", 1) } keys %below;
}
else {
    my @prefixes = map { "$_/" } keys %below;
    for my $line (split /\n/, $listing) {
        my $path = substr($line, 0, index($line, "\t"));
        push @baseline, $line if $noted{$path} || $below{$path} || grep { index($path, $_) == 0 } @prefixes;
    }
}
undef $listing;
my (@out, @hash, %seen);
for my $line (@baseline) {
    my ($path, $type, $mode, $uid, $gid, $size, $mtime, $ctime, $target) = split /\t/, $line, -1;
    next if $path eq "" || $seen{$path}++;
    my $was = $now{$path};
    if (!$was) { push @out, "D\t$path"; next }
    my ($t, $m, $u, $g, $s, $mt, $ct, $l) = @$was;
    if ($t ne $type || $m ne $mode || $u ne $uid || $g ne $gid || ($t eq "f" && $s ne $size) || $l ne ($target // "")) {
        push @out, "C\t$path";
    }
    elsif ($t eq "f" && ($mt ne $mtime || $ct ne $ctime)) { push @hash, $path }
}
push @out, map { "A\t$_" } grep { !$seen{$_} } keys %now;

# MD5 (RFC 1321) of a small file, here rather than by starting md5sum (a tenth of a second or more under
# emulation); 64-bit integers only: the sums below must not pass 2**64.
my @K = map { int(abs(sin($_ + 1)) * 2**32) } 0 .. 63;
my @R = ((7, 12, 17, 22) x 4, (5, 9, 14, 20) x 4, (4, 11, 16, 23) x 4, (6, 10, 15, 21) x 4);
sub md5_hex {
    my ($data) = @_;
    my $bits = 8 * length $data;
    $data .= "\x80" . ("\0" x ((55 - length $data) % 64)) . pack("VV", $bits & 0xffffffff, int($bits / 2**32));
    my @h = (0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476);
    for (my $at = 0; $at < length $data; $at += 64) {
        my @m = unpack("V16", substr($data, $at, 64));
        my ($a, $b, $c, $d) = @h;
        for my $i (0 .. 63) {
            my ($f, $g);
            if ($i < 16) { ($f, $g) = (($b & $c) | (~$b & $d), $i) }
            elsif ($i < 32) { ($f, $g) = (($d & $b) | (~$d & $c), (5 * $i + 1) % 16) }
            elsif ($i < 48) { ($f, $g) = ($b ^ $c ^ $d, (3 * $i + 5) % 16) }
            else { ($f, $g) = ($c ^ ($b | (~$d & 0xffffffff)), (7 * $i) % 16) }
            $f = ($f + $a + $K[$i] + $m[$g]) & 0xffffffff;
            ($a, $d, $c) = ($d, $c, $b);
            $b = ($b + ((($f << $R[$i]) | ($f >> (32 - $R[$i]))) & 0xffffffff)) & 0xffffffff;
        }
        @h = map { ($h[$_] + ($a, $b, $c, $d)[$_]) & 0xffffffff } 0 .. 3;
    }
    return unpack("H*", pack("V4", @h));
}

# Files whose times moved and nothing else: compared by content with the baseline's hashes (md5sum's
# lines: 32 hex digits, two spaces, the path).
if (@hash) {
    my $sums = "\n" . (slurp("$base/hashes") // "") . "\n";
    my (%old, %new);
    for my $path (@hash) {
        for (my $at = index($sums, "  $path\n"); $at >= 33; $at = index($sums, "  $path\n", $at + 1)) {
            if (substr($sums, $at - 33, 1) eq "\n") { $old{$path} = substr($sums, $at - 32, 32); last }
        }
    }
    undef $sums;
    my @large;
    for my $path (@hash) {
        my $text = ~0 > 0xffffffff && -s $path <= 8192 ? slurp($path) : undef;
        if (defined $text) { $new{$path} = md5_hex($text) } else { push @large, $path }
    }
    if (@large && open(my $md5sum, "-|", split(/ /, $md5), "--", @large)) {
        while (my $line = <$md5sum>) { chomp $line; $new{substr($line, 34)} = substr($line, 0, 32) }
        close $md5sum;
    }
    for my $path (@hash) {
        push @out, "C\t$path" unless defined $old{$path} && defined $new{$path} && $old{$path} eq $new{$path};
    }
}

# Packages, read again only where the package database moved (changes.py's vmfx_pkgdb, to the second).
sub database {
    my @lines;
    for my $root ("/var/lib/dpkg/status", "/lib/apk/db/installed", "/var/lib/rpm", "/usr/lib/sysimage/rpm") {
        my @paths = ($root);
        if (-d $root && opendir(my $dh, $root)) { push @paths, map { "$root/$_" } grep { $_ ne "." && $_ ne ".." } readdir $dh; closedir $dh }
        for my $path (@paths) { my @st = lstat $path or next; push @lines, "$path $st[1] $st[7] $st[9] $st[10]" }
    }
    return join("\n", sort @lines);
}
my $was = slurp("$base/pkgdb") // "";
$was = join("\n", sort map { my @f = split / /; $f[3] =~ s/\..*//; $f[4] =~ s/\..*//; join(" ", @f) } split /\n/, $was);
if ($was eq "" || $was ne database()) {
    my (%before, %after);
    for (split /\n/, slurp("$base/pkgs") // "") { my ($name, $version) = split /\t/; $before{$name} = $version }
    if (-f "/var/lib/dpkg/status") {
        my ($name, $version, $status) = ("", "", "");
        for (split /\n/, (slurp("/var/lib/dpkg/status") // "") . "\n\n", -1) {
            if (/^Package: (\S+)/) { $name = $1 }
            elsif (/^Version: (\S+)/) { $version = $1 }
            elsif (/^Status: \S+ \S+ (\S+)/) { $status = $1 }
            elsif ($_ eq "") {
                $after{$name} = $version if $name ne "" && $status ne "not-installed" && $status ne "config-files";
                ($name, $version, $status) = ("", "", "");
            }
        }
    }
    elsif (-f "/lib/apk/db/installed") {
        my ($name, $version) = ("", "");
        for (split /\n/, (slurp("/lib/apk/db/installed") // "") . "\n\n", -1) {
            if (/^P:(.*)/) { $name = $1 } elsif (/^V:(.*)/) { $version = $1 }
            elsif ($_ eq "") { $after{$name} = $version if $name ne ""; $name = "" }
        }
    }
    elsif (open(my $rpm, "-|", "rpm", "-qa", "--qf", "%{NAME}\t%{EPOCHNUM}:%{VERSION}-%{RELEASE}\n")) {
        while (<$rpm>) { chomp; my ($name, $version) = split /\t/; $after{$name} = $version }
        close $rpm;
    }
    for my $name (keys %after) {
        if (!exists $before{$name}) { push @out, "PA\t$name" }
        elsif (($before{$name} // "") ne $after{$name}) { push @out, "PC\t$name" }
    }
    push @out, map { "PD\t$_" } grep { !exists $after{$_} } keys %before;
}
print join("", map { "$_\n" } @out), "$end\n";
