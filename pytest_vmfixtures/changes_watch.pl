# vmfx-changes-watch: started by vm.changes()' baseline (changes.py) and kept in the saved RAM, it notes
# which paths a test touched, so that vm.changes() compares only those instead of listing the whole disk.
# Only perl-base is needed (Essential on Debian); inotify is reached through syscall(), numbered per
# architecture. Arguments: ARCH DIR, where DIR holds "dirs" (directories to watch, one per line) and
# DIR/../mounts the filesystems they were listed from (one mount point per line). It
# writes DIR/log, one line per path: "P\tpath" (changed, created or removed), "R\tpath" (a directory
# created or moved in: look at all below it), "D\tpath" (a directory removed or moved away: all the
# baseline had below it), "F\ttoken" (everything before has been noted: an answer to DIR/flush), or
# "O\twhy" (events were lost: compare everything), and DIR/ready (its pid) once it watches.
use strict;
use warnings;

$0 = "vmfx-changes-watch";
my ($arch, $dir) = @ARGV;
my %numbers = (  # (inotify_init1, inotify_add_watch)
    x86_64 => [294, 254], i386 => [332, 292], i486 => [332, 292], i586 => [332, 292], i686 => [332, 292],
    aarch64 => [26, 27], riscv64 => [26, 27], loongarch64 => [26, 27], armv7l => [360, 317],
    armv6l => [360, 317], ppc64le => [318, 276], ppc64 => [318, 276], s390x => [324, 285],
);
my $nr = $numbers{$arch} or exit 1;

my $MASK = 0x2 | 0x4 | 0x8 | 0x40 | 0x80 | 0x100 | 0x200      # modify attrib close-write moved create delete
    | 0x01000000 | 0x02000000 | 0x04000000;                     # only directories, not through links, not unlinked
my ($CREATE, $DELETE, $MOVED_FROM, $MOVED_TO) = (0x100, 0x200, 0x40, 0x80);
my ($CLOSE_WRITE, $OVERFLOW, $IGNORED, $ISDIR) = (0x8, 0x4000, 0x8000, 0x40000000);

open(my $log, ">>", "$dir/log") or exit 1;
sub note { my $s = join("", @_); (syswrite($log, $s) // -1) == length $s or exit 0 }  # a full /run: seen as not watching
sub lost { note("O\t$_[0]\n"); exit 0 }

my $fd = syscall($nr->[0], 0);
lost("inotify_init1: $!") if $fd < 0;
open(my $events, "<&=", $fd) or lost("inotify fd: $!");

my %path;
sub watch {
    my ($p, $mask) = @_;
    my $wd = syscall($nr->[1], $fd, $p, $mask);
    if ($wd < 0) {
        return if $! == 2 || $! == 20;  # gone, or no longer a directory, since the listing: noted as changed
        lost("cannot watch $p: $!");     # out of watches, say: a change there would go unseen
    }
    $path{$wd} = $p;
    return $wd;
}
# The filesystems listed (DIR/../mounts): a directory on another (a mount point such as /dev) is not watched.
my %devices;
open(my $roots, "<", "$dir/../mounts") or lost("no $dir/../mounts");
while (my $p = <$roots>) { chomp $p; my @st = lstat $p; $devices{$st[0]} = 1 if @st }
close $roots;
open(my $dirs, "<", "$dir/dirs") or lost("no $dir/dirs");
while (my $p = <$dirs>) {
    chomp $p;
    my @st = lstat $p;
    watch($p, $MASK) if @st && $devices{$st[0]};
}
close $dirs;
my $control = watch($dir, $CLOSE_WRITE);

# Read one event before saying ready: the numbers above are right for this kernel.
my $probe;
open($probe, ">", "$dir/flush") and close $probe;
my $rin = "";
vec($rin, $fd, 1) = 1;
select(my $rout = $rin, undef, undef, 30) > 0 or lost("no inotify events arrive");

my %seen;
my $ready;
open($ready, ">", "$dir/ready.new") and print $ready "$$\n" and close $ready and rename("$dir/ready.new", "$dir/ready")
    or lost("cannot write $dir/ready");
while (1) {
    my $buffer = "";
    my $got = sysread($events, $buffer, 1 << 16);
    lost("reading events: $!") unless $got;
    my $out = "";
    for (my $at = 0; $at + 16 <= length $buffer;) {
        my ($wd, $mask, $cookie, $length) = unpack("iIII", substr($buffer, $at, 16));
        my $name = unpack("Z*", substr($buffer, $at + 16, $length));
        $at += 16 + $length;
        lost("the kernel's event queue overflowed") if $mask & $OVERFLOW;
        if ($mask & $IGNORED) { delete $path{$wd}; next }
        my $parent = $path{$wd};
        next unless defined $parent;
        if ($wd == $control) {
            next unless $name eq "flush" && open(my $in, "<", "$dir/flush");
            my $token = <$in> // "";
            close $in;
            chomp $token;
            $out .= "F\t$token\n" if $token ne "";
            next;
        }
        my $p = $length ? ($parent eq "/" ? "/$name" : "$parent/$name") : $parent;
        my $kind = "P";
        if ($p =~ /\n/) { ($p, $kind) = ($parent, "R") }  # a name a line cannot hold: look at all of its directory
        elsif ($mask & $ISDIR && $mask & ($CREATE | $MOVED_TO)) { $kind = "R" }
        elsif ($mask & $ISDIR && $mask & ($DELETE | $MOVED_FROM)) { $kind = "D" }
        next if $seen{"$kind\t$p"}++;
        lost("more paths changed than are worth noting one by one") if keys %seen > 200000;
        $out .= "$kind\t$p\n";
    }
    note($out) if $out ne "";
    select(undef, undef, undef, 0.02);  # let a burst of writes to one file merge into one event
}
