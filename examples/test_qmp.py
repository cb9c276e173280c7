"""Talk to QEMU itself: the guest's run state, its devices, a snapshot of our own."""

from __future__ import annotations


def test_guest_is_running(vm):
    assert vm.qmp.execute("query-status")["status"] == "running"


def test_guest_has_a_virtio_disk(vm):
    devices = vm.qmp.execute("query-block")
    assert any(d["device"] == "" or d.get("qdev") for d in devices)


def test_own_snapshot_and_revert(vm):
    vm.run("echo before > /root/state", check=True)
    vm.snapshot("mine")
    vm.run("echo after > /root/state", check=True)
    vm.revert("mine")
    assert vm.run("cat /root/state", check=True).stdout.strip() == "before"
