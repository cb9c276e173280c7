#!/bin/sh
# A second, private libvirtd on this machine, to test the libvirt backend with two "hosts".
#
#   tests/libvirt/second_libvirtd.sh start        # prints the URI to use, e.g. for VMFX_LIBVIRT_URI2
#   tests/libvirt/second_libvirtd.sh uri
#   tests/libvirt/second_libvirtd.sh remote-uri   # the same daemon, reached as a remote host
#   tests/libvirt/second_libvirtd.sh restart      # after it was killed, over the same state
#   tests/libvirt/second_libvirtd.sh stop
#
# A privileged libvirtd keeps its state in fixed places (/run/libvirt, /var/lib/libvirt,
# /var/log/libvirt, /etc/libvirt), which a second daemon must not share with the first: it
# would adopt the other's domains. So both daemons of the pair (virtlogd and libvirtd) run in
# a private mount namespace where those directories are bind mounts of directories under
# $VMFX_LIBVIRTD2_DIR; only their socket directory is outside the bind mounts, so clients
# reach it at qemu:///system?socket=$VMFX_LIBVIRTD2_DIR/sock/libvirt-sock.
#
# The daemon can also pass for another machine: its storage pool "vmfixtures" is a tmpfs mounted
# only inside its namespace (so this side cannot see the files in it), and remote-uri reaches it
# through libvirt's "ext" transport (a command's stdin/stdout, here nc on its socket) rather than a
# unix socket, so no file descriptor can be passed. The plugin then treats it as a remote host:
# images and saved states are uploaded into the pool, exactly as to a hypervisor elsewhere.
# Needs root (as the first libvirtd does), util-linux's unshare and netcat-openbsd.
set -eu

BASE=${VMFX_LIBVIRTD2_DIR:-/tmp/vmfx-libvirtd2}
URI="qemu:///system?socket=$BASE/sock/libvirt-sock"
REMOTE_URI="qemu+ext:///system?command=$BASE/connect"
POOL_DIR=/var/lib/libvirt/vmfixtures

# Start the daemons in a new private mount namespace over $BASE (made by start), and wait for them.
launch() {
    unshare --mount --propagation private sh -c '
        set -e
        base=$1
        mount --bind "$base/etc" /etc/libvirt
        mount --bind "$base/run" /run/libvirt
        mount --bind "$base/lib" /var/lib/libvirt
        mount --bind "$base/cache" /var/cache/libvirt
        mount --bind "$base/log" /var/log/libvirt
        mount -t tmpfs -o size=8g,mode=0711 vmfx-pool '"$POOL_DIR"'
        mkdir -p /var/lib/libvirt/qemu /var/cache/libvirt/qemu /var/log/libvirt/qemu
        if ! [ -f "$base/virtlogd.pid" ] || ! kill -0 "$(cat "$base/virtlogd.pid")" 2>/dev/null; then
            virtlogd -d -p "$base/virtlogd.pid"
        fi
        libvirtd -d -f "$base/etc/libvirtd.conf" -p "$base/libvirtd.pid"
    ' sh "$BASE"
    i=0
    until virsh -c "$URI" version >/dev/null 2>&1; do
        i=$((i + 1))
        if [ "$i" -gt 100 ]; then
            echo "second libvirtd did not answer at $URI" >&2
            exit 1
        fi
        sleep 0.1
    done
}

# Whether the daemon whose pid file is $1 runs (a killed one may linger a moment as a zombie).
running() {
    [ -f "$1" ] || return 1
    pid=$(cat "$1")
    [ -n "$pid" ] && [ -r "/proc/$pid/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status"
}

# After the daemon was killed (a fault test): start it again over the same state, so it finds the
# guests that outlived it. Its pool comes back empty (a new tmpfs).
restart() {
    if running "$BASE/libvirtd.pid"; then
        return 0
    fi
    rm -f "$BASE/libvirtd.pid"
    launch
}

start() {
    if running "$BASE/libvirtd.pid"; then
        echo "$URI"
        return 0
    fi
    rm -rf "$BASE"
    mkdir -p "$BASE/sock" "$BASE/run" "$BASE/lib/vmfixtures" "$BASE/cache" "$BASE/log"
    chmod 0700 "$BASE"
    printf '#!/bin/sh\nexec nc -U %s/sock/libvirt-sock\n' "$BASE" >"$BASE/connect"
    chmod 0700 "$BASE/connect"
    # Our own copy of the configuration, without the first daemon's persistent domains and networks.
    cp -a /etc/libvirt "$BASE/etc"
    find "$BASE/etc/qemu" -maxdepth 1 -name '*.xml' -delete 2>/dev/null || true
    rm -rf "$BASE/etc/qemu/networks/autostart" "$BASE/etc/qemu/autostart"
    cat >"$BASE/etc/libvirtd.conf" <<EOF
unix_sock_dir = "$BASE/sock"
unix_sock_group = "root"
unix_sock_rw_perms = "0700"
unix_sock_ro_perms = "0700"
unix_sock_admin_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
EOF
    launch
    virsh -q -c "$URI" pool-define-as vmfixtures dir --target "$POOL_DIR" >/dev/null
    virsh -q -c "$URI" pool-autostart vmfixtures >/dev/null
    virsh -q -c "$URI" pool-start vmfixtures >/dev/null
    echo "$URI"
}

stop() {
    # Everything on this private daemon is ours: its guests go first (QEMU outlives libvirtd).
    if [ -S "$BASE/sock/libvirt-sock" ]; then
        for dom in $(virsh -c "$URI" list --name 2>/dev/null); do
            virsh -c "$URI" destroy "$dom" >/dev/null 2>&1 || true
        done
    fi
    for name in libvirtd virtlogd; do
        pidfile="$BASE/$name.pid"
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        i=0
        while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 50 ]; do
            i=$((i + 1))
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
    done
    rm -rf "$BASE"
}

case "${1:-}" in
    start) start ;;
    restart) restart ;;
    stop) stop ;;
    uri) echo "$URI" ;;
    remote-uri) echo "$REMOTE_URI" ;;
    *) echo "usage: $0 start|restart|stop|uri|remote-uri" >&2; exit 2 ;;
esac
