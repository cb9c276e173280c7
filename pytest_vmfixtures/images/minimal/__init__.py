"""The minimal builder (``builder = "extract"``): a busybox system made of unpacked packages.

No package's scripts run and nothing needs root: :mod:`.extract` downloads and
unpacks the packages and picks the files a guest needs, :mod:`.elf` finds their
libraries and kernel modules, :mod:`.system` writes the init, network and SSH
setup, :mod:`.fstree` turns it all into an archive owned by root.
"""
