#!/bin/sh
# A private libvirt NAT network for the libvirt backend's snapshot mode (--vm-libvirt-mode snapshot).
#
#   tests/libvirt/nat_network.sh start   # prints the network's name, for --vm-libvirt-network
#   tests/libvirt/nat_network.sh stop
#
# The network is transient (net-create): it is gone with libvirtd, and stop removes it. Its own
# bridge and subnet (192.168.213.0/24, DHCP from libvirt's dnsmasq, package dnsmasq-base), so it
# never touches libvirt's "default" network. Guests reach the outside through NAT; the rules added
# here keep them from the host's own services: from the bridge the host answers DHCP and DNS
# (libvirt's own rules accept those first) and replies to connections it opened (SSH to the guests),
# and rejects everything else. Needs root and iptables. LIBVIRT_URI overrides qemu:///system.
set -eu

NAME=${VMFX_NAT_NETWORK:-vmfx-nat}
BRIDGE=vmfxnat0
URI=${LIBVIRT_URI:-qemu:///system}
RULES="-i $BRIDGE -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-i $BRIDGE -j REJECT"

rules() {  # rules add|delete: the host-guarding rules, after libvirt's own (which accept DHCP and DNS)
    echo "$RULES" | while read -r rule; do
        if [ "$1" = add ]; then
            # shellcheck disable=SC2086
            iptables -C INPUT $rule 2>/dev/null || iptables -A INPUT $rule
        else
            # shellcheck disable=SC2086
            while iptables -D INPUT $rule 2>/dev/null; do :; done
        fi
    done
}

case "${1:-}" in
start)
    if ! virsh -q -c "$URI" net-info "$NAME" >/dev/null 2>&1; then
        xml=$(mktemp)
        trap 'rm -f "$xml"' EXIT
        cat >"$xml" <<XML
<network>
  <name>$NAME</name>
  <forward mode='nat'/>
  <bridge name='$BRIDGE' stp='off' delay='0'/>
  <ip address='192.168.213.1' netmask='255.255.255.0'>
    <dhcp><range start='192.168.213.10' end='192.168.213.250'/></dhcp>
  </ip>
</network>
XML
        virsh -q -c "$URI" net-create "$xml" >/dev/null
    fi
    rules add
    echo "$NAME"
    ;;
stop)
    virsh -q -c "$URI" net-destroy "$NAME" >/dev/null 2>&1 || true
    rules delete
    ;;
*)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
