"""The libvirt backend: guests are transient libvirt domains, on one host or several.

Same semantics as the QEMU backend: each guest runs on its own qcow2 overlay
over a read-only layer, with QEMU's user-mode network (``restrict=on`` by
default) forwarding one 127.0.0.1 port to sshd, and a ready state saved once
and restored many times, in parallel. The domain XML is the template
``domain.xml`` next to this file (domain.py fills it in).

How a state is saved and restored, and why:

* save: ``virDomainSave`` writes libvirt's save image (a small header, the
  domain XML, then QEMU's migration stream) to ``memory``; the domain, being
  transient, is gone afterwards and its overlay becomes ``disk.qcow2``.
* restore: libvirt's own ``virDomainRestoreFlags`` only accepts a replacement
  XML with the *same UUID* ("Target domain uuid ... does not match source"),
  and one libvirtd never runs two domains with one UUID, so a saved file could
  back only one live guest at a time. The pool needs several (the guest in
  use and its spare). So each restore starts a new domain (own name, UUID,
  overlay, console, port) with QEMU's ``-incoming defer``, hands QEMU the save
  image's migration stream as a file descriptor through the monitor
  (``virDomainQemuMonitorCommandWithFiles``, libvirt >= 8.2), starts the
  incoming migration, and resumes the domain through libvirt once it loaded.

The guest agent's socket belongs to libvirt; commands reach the agent through
``virDomainQemuAgentCommand`` (:class:`LibvirtAgentTransport`), and QMP
through ``virDomainQemuMonitorCommand`` (:class:`LibvirtQMP`); both in channels.py.

Several hosts: each URI is one libvirtd; a new guest goes to the connection
with the fewest running guests. A libvirtd reached over a unix socket shares
this machine's files (the cache is used in place, the saved RAM is handed over
as a descriptor). Any other transport (``qemu+ssh://``, ``+tcp``, ``+tls``,
``+ext``) is a *remote* host: images, kernels and saved states are copied into
its storage pool once and kept there by digest (storage.py); guests
are restored by libvirt itself from a per-guest copy of the saved RAM with its
own UUID (save.py); the serial console is streamed back over the
connection into the local console.log (console.py); SSH reaches the guest's
forwarded port on the host's loopback, through ``ssh -W`` for ``qemu+ssh://``
hosts (ssh_route.py).

The modules: backend.py (LibvirtBackend: hosts, the mode, closing), mode.py (the
interface of the two modes), saved_state.py (saved-state mode: start, save, restore),
snapshot_mode.py and snapshot.py (snapshot mode: see docs/libvirt.md), network.py (its libvirt
network), drivers.py (the other hypervisors' templates), placement.py (which host a guest goes to,
the guests placed), uris.py (defaults, which URIs are QEMU's),
machine.py (LibvirtMachine), connection.py (a libvirtd per URI, which host
gets a guest, reaping), teardown.py (removing a domain, on every driver), names.py (what a run's domains and volumes are called),
domain.py (the XML), xmltext.py (escaping, templates), save.py (the save image
format, saving; backends/common.py loads a state), storage.py (a remote host's pool: uploads, checks,
what a guest needs there), channels.py, console.py, ssh_route.py, and
calls.py (libvirt-python, optional, and calls with a deadline).
"""

from .backend import LibvirtBackend
from .connection import shares_files
from .machine import LibvirtMachine
from .names import CLIENT
from .ssh_route import ssh_route
from .storage import qcow2_virtual_size

__all__ = [
    "CLIENT",
    "LibvirtBackend",
    "LibvirtMachine",
    "qcow2_virtual_size",
    "shares_files",
    "ssh_route",
]
