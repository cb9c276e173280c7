#!/bin/sh
# An sshd on 127.0.0.2:2222 in front of the second libvirtd, so the libvirt backend's qemu+ssh:// path
# (libvirt's ssh transport, and the guests' SSH through "ssh -W" via the hypervisor) runs for real.
#
#   tests/libvirt/ssh_hypervisor.sh start   # prints the qemu+ssh:// URI (start the second libvirtd first)
#   tests/libvirt/ssh_hypervisor.sh uri
#   tests/libvirt/ssh_hypervisor.sh stop
#
# Test-only: root logs in with a key made here. libvirt's own connection does not verify the host key (the URI
# says no_verify=1); the plugin's route to the guests always does, here against the known_hosts file the URI
# names (known_hosts=, holding this sshd's key). Needs root and openssh-server.
set -eu

BASE=${VMFX_SSHHV_DIR:-/tmp/vmfx-sshhv}
LIBVIRTD2=${VMFX_LIBVIRTD2_DIR:-/tmp/vmfx-libvirtd2}
ADDR=127.0.0.2
PORT=2222
URI="qemu+ssh://root@$ADDR:$PORT/system?socket=$LIBVIRTD2/sock/libvirt-sock&keyfile=$BASE/client_key&no_verify=1&known_hosts=$BASE/known_hosts"

start() {
    if [ -f "$BASE/sshd.pid" ] && kill -0 "$(cat "$BASE/sshd.pid")" 2>/dev/null; then
        echo "$URI"
        return 0
    fi
    rm -rf "$BASE"
    mkdir -p "$BASE" /run/sshd
    chmod 0700 "$BASE"
    ssh-keygen -q -t ed25519 -N "" -f "$BASE/host_key"
    ssh-keygen -q -t ed25519 -N "" -f "$BASE/client_key"
    cp "$BASE/client_key.pub" "$BASE/authorized_keys"
    echo "[$ADDR]:$PORT $(cut -d' ' -f1-2 "$BASE/host_key.pub")" >"$BASE/known_hosts"
    cat >"$BASE/sshd_config" <<CONF
ListenAddress $ADDR:$PORT
HostKey $BASE/host_key
PidFile $BASE/sshd.pid
AuthorizedKeysFile $BASE/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
CONF
    /usr/sbin/sshd -f "$BASE/sshd_config"
    i=0
    until ssh -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile="$BASE/known_hosts" -i "$BASE/client_key" \
        -p "$PORT" "root@$ADDR" true 2>/dev/null; do
        i=$((i + 1))
        if [ "$i" -gt 50 ]; then
            echo "test sshd did not answer on $ADDR:$PORT" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "$URI"
}

stop() {
    if [ -f "$BASE/sshd.pid" ]; then
        kill "$(cat "$BASE/sshd.pid")" 2>/dev/null || true
    fi
    rm -rf "$BASE"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    uri) echo "$URI" ;;
    *) echo "usage: $0 start|stop|uri" >&2; exit 2 ;;
esac
