"""Private networks: guests see each other by name, and only each other."""

from __future__ import annotations

import pytest

BUSYBOX = "/bin/busybox"


def _with_busybox(guest):
    guest.put(BUSYBOX, "/usr/local/bin/busybox")
    guest.run("chmod 755 /usr/local/bin/busybox", check=True)
    return guest


# The private segment's NIC is hot-plugged through QEMU's monitor.
@pytest.mark.vm(image="debian-12", needs=["qmp"])
def test_three_guests_on_one_segment(vm, vm_network):
    a = _with_busybox(vm_network.attach(vm, "alpha"))
    b = _with_busybox(vm_network.add("beta"))
    c = _with_busybox(vm_network.add("gamma"))
    assert len({a.ip, b.ip, c.ip}) == 3
    for src, dst in ((a, "beta"), (b, "gamma"), (c, "alpha")):
        assert src.run(f"busybox ping -c 1 -W 5 {dst}", timeout=30).ok, f"{src.network_name} -> {dst}"


@pytest.mark.vm(image="debian-12", needs=["qmp"])
def test_two_networks_are_isolated(vm_factory, vm_network, request):
    from pytest_vmfixtures.fixtures import SESSION_KEY
    from pytest_vmfixtures.network import Network

    other = Network(request.config.stash[SESSION_KEY].pool.backend, vm_factory, subnet=1)
    here = _with_busybox(vm_network.add("here"))
    there = _with_busybox(other.add("there"))
    # Same subnet numbering would not matter: the segments are separate wires.
    here.run(f"ip addr add 10.199.1.99/24 dev $(ip -o addr show to {here.ip} | awk '{{print $2}}')", check=True)
    assert not here.run(f"busybox ping -c 1 -W 3 {there.ip}", timeout=30).ok


@pytest.mark.vm(image="debian-12", needs=["qmp"])
def test_a_network_attachment_is_gone_after_revert(vm, vm_network):
    # Attach and revert in one test: its verdict does not depend on what ran before it on this worker.
    attached = vm_network.attach(vm, "alpha")
    assert vm.run(f"ip -o addr | grep -c '{attached.ip}/'").stdout.strip() == "1"
    vm.revert()
    assert vm.run("ip -o addr | grep -c 10.199.").stdout.strip() == "0"
