"""Client and server on a private network: HTTP between guests of different OSes, nothing to the host."""

from __future__ import annotations

import socket
import threading

import pytest

BUSYBOX = "/bin/busybox"  # Debian's busybox-static on the host: one static binary, runs in any x86-64 guest


@pytest.fixture
def host_service():
    """A TCP service on the host's loopback that guests must not reach."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    hits = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            hits.append(1)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], hits
    stop.set()
    thread.join(2)
    server.close()


@pytest.mark.vm(image="debian-12")
def test_http_between_guests(vm_network, host_service):
    port, hits = host_service
    server = vm_network.add("server", image="debian-12")
    client = vm_network.add("client", image="debian-12-sysv")
    for guest in (server, client):
        # The images carry no web server or client: bring the host's static busybox along.
        guest.put(BUSYBOX, "/usr/local/bin/busybox")
        guest.run("chmod 755 /usr/local/bin/busybox", check=True)
    server.run("mkdir -p /srv/www && echo hello-from-server > /srv/www/index.html", check=True)
    server.run("cd /srv/www && (setsid busybox httpd -f -p 80 >/dev/null 2>&1 &) ; true", check=True)
    fetch = "for i in 1 2 3 4 5 6 7 8 9 10; do busybox wget -q -O - http://server/ && break; sleep 0.5; done"
    assert client.run(fetch, timeout=60).stdout.strip() == "hello-from-server"
    assert server.ip != client.ip
    for guest in (server, client):
        # The host's loopback is unreachable: slirp's gateway forwards nothing (restrict=on).
        reach = f"busybox nc -w 3 10.0.2.2 {port} </dev/null"
        assert not guest.run(reach, timeout=30).ok
    assert hits == []
