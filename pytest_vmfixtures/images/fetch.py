"""Downloading a user's cloud image: hashed while it streams, refused if it is a web page, bounded.

A download holds its cache entry's lock, which other workers wait on: it has a deadline as a whole (not
only per socket operation) and takes no more than the server announced, or a limit when it announced
nothing.
"""

from __future__ import annotations

import hashlib
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from ..errors import ImageError

DOWNLOAD_SECONDS = 3 * 3600.0  # a whole cloud image download; it holds the entry's cache lock meanwhile
MAX_DOWNLOAD_BYTES = 64 << 30  # when the server announces no length: larger than any cloud image
CHUNK = 1 << 20
PROGRESS_EVERY = 3.0  # seconds between download progress lines
HTML_TYPES = ("text/html", "application/xhtml+xml")
Progress = Callable[[str], None]


def download(url: str, sha256: str, target: Path, progress: Progress, timeout: float = 60.0,
             deadline: float = DOWNLOAD_SECONDS, limit: int = MAX_DOWNLOAD_BYTES) -> None:
    """Stream ``url`` into ``target``, hashing as it goes; a mismatch removes the file and raises.

    ``timeout`` bounds each socket operation, ``deadline`` the whole download (it holds the cache lock
    other workers wait on), and no more than the announced Content-Length (or ``limit``) is taken: a
    server that trickles or streams without end is stopped, not waited on until the disk is full."""
    expected = sha256.lower()
    digest = hashlib.sha256()
    done = 0
    started = last = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(target, "wb") as out:
            kind = response.headers.get_content_type()
            if kind in HTML_TYPES:
                raise _web_page(url, f" ({kind})")
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            progress(f"downloading {url}" + (f" ({total / 2**20:.0f} MiB)" if total else ""))
            while chunk := response.read1(CHUNK):  # what has come: the deadline is checked as data trickles in
                if done == 0 and _looks_like_html(chunk):
                    raise _web_page(url)
                digest.update(chunk)
                out.write(chunk)
                done += len(chunk)
                now = time.monotonic()
                if done > (total if total is not None else limit):
                    raise ImageError(f"cannot download {url}: the server sent more than "
                                     f"{'its Content-Length' if total is not None else 'the limit'} "
                                     f"({total if total is not None else limit} bytes); check the URL")
                if now - started > deadline:
                    raise ImageError(f"cannot download {url}: it did not finish within {deadline:g} s "
                                     f"({done / 2**20:.0f} MiB so far); check the server or download it yourself "
                                     "and pass the file's path")
                if now - last >= PROGRESS_EVERY:
                    last = now
                    share = f" ({100 * done / total:.0f}%)" if total else ""
                    progress(f"downloaded {done / 2**20:.0f} MiB{share} of {url}")
    except ImageError:
        target.unlink(missing_ok=True)
        raise
    except (urllib.error.URLError, OSError, ValueError) as exc:
        target.unlink(missing_ok=True)
        raise ImageError(f"cannot download {url}: {getattr(exc, 'reason', exc)}") from exc
    actual = digest.hexdigest()
    if actual != expected:
        target.unlink(missing_ok=True)
        raise ImageError(
            f"{url} has sha256 {actual}, not the expected {expected}; the download was removed. "
            "Fix sha256= (or the URL)"
        )
    rate = done / 2**20 / max(time.monotonic() - started, 1e-3)
    progress(f"downloaded {url}: {done / 2**20:.0f} MiB, checksum verified ({rate:.0f} MiB/s)")


def _web_page(url: str, kind: str = "") -> ImageError:
    return ImageError(f"{url} serves a web page{kind}, not a disk image: give the URL of the "
                      ".qcow2 or .img file itself (the download link, not the page listing it)")


def _looks_like_html(chunk: bytes) -> bool:
    start = chunk[:512].lstrip().lower()
    return start.startswith((b"<!doctype html", b"<html", b"<?xml")) or b"<html" in start[:256]
