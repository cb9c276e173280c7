"""A remote guest's serial console, streamed back over libvirt into the local console.log.

(A guest on this machine writes its console to the file itself: see the ``serial``
element in domain.py.)
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any

from .calls import bounded, libvirt


class ConsolePump:
    """A remote guest's serial console, streamed over libvirt into a local file.

    The stream gets a connection of its own: a thread blocked reading it would
    otherwise hold up every other call on the guest's connection.
    """

    def __init__(self, uri: str, domain: Any, target: Path) -> None:
        self.conn = libvirt.open(uri)
        try:
            self.stream = self.conn.newStream(0)
            self.conn.lookupByUUIDString(domain.UUIDString()).openConsole(
                None, self.stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE
            )
        except BaseException:
            self.conn.close()
            raise
        self.target = target
        self._thread = threading.Thread(target=self._pump, name=f"console-{target.parent.name}", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        with open(self.target, "ab") as f:
            while True:
                try:
                    data = self.stream.recv(65536)
                except libvirt.libvirtError:
                    return  # the domain ended
                if isinstance(data, int) or not data:
                    return
                f.write(data)
                f.flush()

    def close(self) -> None:
        """After the domain is gone (which ends the stream)."""
        self._thread.join(timeout=10)
        with contextlib.suppress(Exception):
            bounded("closing a console stream", self.conn.close, 10)
