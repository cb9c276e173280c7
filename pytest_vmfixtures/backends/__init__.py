"""Backends start, save, restore and stop machines; nothing outside them knows QEMU flags or libvirt XML."""
