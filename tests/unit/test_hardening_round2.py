"""Small findings of the second security review (L-numbers refer to it), each with the case that broke."""

from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree

import pytest


def test_the_libvirt_network_name_is_escaped_in_the_domain_xml() -> None:
    """L9: a network name with a quote or an ampersand stays one attribute value, no element is injected."""
    from pytest_vmfixtures.backends.libvirt.network import interface_xml

    name = "net' /><filterref filter='clean-traffic'/><x a='&"
    element = ElementTree.fromstring(interface_xml(name, "52:54:00:12:34:56"))
    source = element.find("source")
    assert source is not None and source.get("network") == name
    assert element.find("filterref") is None and [child.tag for child in element] == ["source", "mac", "model"]


def test_a_qcow2_with_an_external_data_file_is_refused(tmp_path: Path) -> None:
    """L1: the image's clusters would be read from a host file it names (here one that looks like a disk)."""
    import subprocess

    from pytest_vmfixtures.errors import ImageError
    from pytest_vmfixtures.images.byo import disk_info

    data = tmp_path / "d.img"
    data.write_bytes(b"\0" * 510 + b"\x55\xaa" + b"\0" * (1 << 20))  # an MBR signature: a host "disk"
    image = tmp_path / "x.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={data},data_file_raw=on",
                    str(image), "64M"], check=True, timeout=60)
    with pytest.raises(ImageError, match="external file"):
        disk_info(image)


def test_prune_keeps_what_a_live_session_uses_with_no_guest_running(tmp_path: Path) -> None:
    """L2: a libvirt guest's seed, a remote host's state, an idle slot's state: no local overlay names them."""
    from pytest_vmfixtures.images.cache import Cache
    from pytest_vmfixtures.images.prune import plan
    from pytest_vmfixtures.runtime import Runtime

    cache = Cache(tmp_path / "cache")
    cache.ensure_writable()
    seed = cache.root / "seeds" / "0123456789abcdef0123456789abcdef-debian-1"
    state = cache.root / "states" / "tiny-0123456789abcdef"
    for entry in (seed, state):
        entry.mkdir(parents=True)
    (seed / "seed.iso").write_bytes(b"")
    runtime = Runtime(cache.root)
    try:
        runtime.record_use(seed / "seed.iso", state)
        candidates, _ = plan(cache, {}, everything=True)
        assert not {c.path for c in candidates} & {seed, state}
    finally:
        runtime.close()
    candidates, _ = plan(cache, {}, everything=True)
    assert {seed, state} <= {c.path for c in candidates}  # the session is over: they may go


def test_a_ram_file_that_cannot_fit_is_refused_before_any_block_is_taken(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """L7: fallocate past the free space would fill the filesystem for everyone until the unlink.

    The filesystem's free space is reported smaller than the guest's RAM (a FAKE statvfs: a real nearly
    full filesystem needs a mount); nothing may be allocated or left."""
    from types import SimpleNamespace

    from pytest_vmfixtures.backends.qemu import memory
    from pytest_vmfixtures.errors import GuestError

    monkeypatch.setattr(memory.os, "statvfs", lambda path: SimpleNamespace(f_bavail=100, f_frsize=1 << 20))
    monkeypatch.setattr(memory.os, "posix_fallocate", lambda *args: pytest.fail("allocated although it cannot fit"))
    with pytest.raises(GuestError, match="No space left on device \\(only 100 MiB free"):
        memory.allocate(tmp_path / "ram", 512)
    assert not (tmp_path / "ram").exists()


class _Endless:
    """A local HTTP server that streams without end: ``length`` announced (None: no Content-Length),
    ``pause`` seconds between its 4 KiB pieces."""

    def __init__(self, length: int | None, pause: float) -> None:
        import http.server
        import threading

        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the standard library's name
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                if length is not None:
                    self.send_header("Content-Length", str(length))
                self.end_headers()
                try:
                    while not outer.stopped.is_set():
                        self.wfile.write(b"\1" * 4096)
                        self.wfile.flush()
                        outer.stopped.wait(pause)
                except OSError:
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.stopped = threading.Event()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/disk.qcow2"

    def close(self) -> None:
        self.stopped.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize(("length", "pause", "limit", "deadline", "message"), [
    (None, 0.0, 1 << 20, 600.0, "more than the limit"),  # says nothing, sends on and on
    (None, 0.05, 1 << 30, 2.0, "did not finish within 2 s"),  # trickles
])
def test_a_download_that_never_ends_is_stopped(tmp_path: Path, length: int | None, pause: float, limit: int,
                                               deadline: float, message: str) -> None:
    """L11: the download holds the cache lock other workers wait on; it stops, and leaves no file."""
    from pytest_vmfixtures.errors import ImageError
    from pytest_vmfixtures.images.fetch import download

    server = _Endless(length, pause)
    try:
        with pytest.raises(ImageError, match=message):
            download(server.url, "0" * 64, tmp_path / "disk", lambda m: None, timeout=30, deadline=deadline, limit=limit)
    finally:
        server.close()
    assert not (tmp_path / "disk").exists()


def test_a_libvirt_call_that_completes_after_its_deadline_is_undone() -> None:
    """L5: a createXML answering after the deadline returns a running domain nobody holds; it is destroyed.

    The call is a FAKE (a function that waits, then returns a stand-in domain): a libvirtd that answers
    late cannot be made on demand."""
    import threading

    from pytest_vmfixtures.backends.libvirt.calls import bounded
    from pytest_vmfixtures.errors import GuestError

    release, undone = threading.Event(), threading.Event()
    created: list[str] = []

    def late_create() -> str:
        release.wait(60)
        created.append("vmfx-late-1")
        return "vmfx-late-1"

    with pytest.raises(GuestError, match="did not answer within 0.2 s"):
        bounded("starting vmfx-late-1", late_create, 0.2, undo=lambda domain: (created.remove(domain), undone.set()))
    release.set()
    assert undone.wait(60)
    assert created == []


def test_removing_a_symlinked_cache_entry_leaves_its_target_alone(tmp_path: Path) -> None:
    """Minor note of the review: the walk followed the link and made the target's files writable."""
    from pytest_vmfixtures.images.cache import remove_tree

    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep").write_text("mine")
    (target / "keep").chmod(0o400)
    entry = tmp_path / "states" / "tiny-0123456789abcdef"
    entry.parent.mkdir()
    entry.symlink_to(target)
    remove_tree(entry)
    assert not entry.is_symlink() and not entry.exists()
    assert (target / "keep").read_text() == "mine" and (target / "keep").stat().st_mode & 0o777 == 0o400
