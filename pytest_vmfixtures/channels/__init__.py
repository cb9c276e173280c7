"""Ways of talking to a guest: QMP to QEMU, SSH and the guest agent to the OS."""
