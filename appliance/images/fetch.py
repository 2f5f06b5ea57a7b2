"""Bring an artifact's bytes to a ``.part`` file beside its destination, hashing as it goes.

HTTP(S) downloads resume: an existing ``.part`` is hashed first and continued with a
``Range: bytes=N-`` request. A server that answers 200 instead of 206 sends the whole
file, so the part restarts from zero. A download cut off midway keeps its ``.part`` for
the next attempt. Local files are copied (never linked: the store owns its bytes); their
source is never moved or changed.

Nothing here decides whether the bytes are good: the caller compares the sha256.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from appliance import __version__
from appliance.images.progress import Progress

CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"^bytes\s+(\d+)-(\d+)/(\d+|\*)$|^bytes\s+\*/(\d+)$")


class FetchError(Exception):
    """The bytes could not be brought in; the message says which artifact, from where, why."""


@dataclass(frozen=True)
class Fetched:
    sha256: str
    size: int
    #: Bytes that were already in the ``.part`` file and kept (0: fresh start).
    resumed_from: int = 0


def _hash_file(path: Path, hasher: hashlib._Hash, progress: Progress | None = None) -> int:
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
            size += len(chunk)
            if progress:
                progress.update(size)
    return size


def sha256_file(path: Path) -> tuple[str, int]:
    hasher = hashlib.sha256()
    size = _hash_file(path, hasher)
    return hasher.hexdigest(), size


def fetch_local(label: str, source: Path, part: Path, progress: Progress,
                title: str = "") -> Fetched:
    """Copy ``source`` to ``part`` and hash it. ``label`` starts error messages,
    ``title`` (default: the label) names the transfer in the progress output."""
    if not source.is_file():
        raise FetchError(f"{label}: no such file")
    part.parent.mkdir(parents=True, exist_ok=True)
    part.unlink(missing_ok=True)
    hasher = hashlib.sha256()
    total = source.stat().st_size
    progress.start(title or label, total, verb="reading")
    try:
        # Always a copy: a hard link would share the inode with a file outside the store,
        # and whoever can write that file could change what is served after the check.
        with source.open("rb") as src, part.open("wb") as dst:
            size = 0
            while chunk := src.read(CHUNK):
                hasher.update(chunk)
                dst.write(chunk)
                size += len(chunk)
                progress.update(size)
            dst.flush()
            os.fsync(dst.fileno())
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise FetchError(f"{label}: cannot read {source}: {exc.strerror or exc}") from None
    finally:
        progress.finish()
    return Fetched(hasher.hexdigest(), size)


def _range_total(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a Content-Range header; None where absent or ``*``."""
    match = _CONTENT_RANGE.match((value or "").strip())
    if not match:
        return None, None
    if match.group(4):
        return None, int(match.group(4))
    total = match.group(3)
    return int(match.group(1)), (None if total == "*" else int(total))


def fetch_url(label: str, url: str, part: Path, progress: Progress, *,
              expected_size: int = 0, timeout: float = 30.0, title: str = "") -> Fetched:
    """Download ``url`` into ``part``, resuming what is there; return its hash and size.

    ``expected_size`` (0: unknown) is checked against what the server announces and what
    arrives, so a wrong file is stopped early instead of filling the disk.
    """
    part.parent.mkdir(parents=True, exist_ok=True)
    hasher = hashlib.sha256()
    offset = 0
    if part.exists():
        offset = part.stat().st_size
        if expected_size and offset > expected_size:
            part.unlink()
            offset = 0
        else:
            _hash_file(part, hasher)
    if expected_size and offset == expected_size:
        return Fetched(hasher.hexdigest(), offset, offset)
    resumed_from = offset

    for _attempt in range(2):
        headers = {"User-Agent": f"appliance/{__version__}", "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            response = urllib.request.urlopen(
                urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 416 and offset:
                _, total = _range_total(exc.headers.get("Content-Range"))
                if total == offset:  # the part already holds the whole file
                    return Fetched(hasher.hexdigest(), offset, offset)
                # The part is longer than the file now offered: start over once.
                part.unlink(missing_ok=True)
                offset, resumed_from, hasher = 0, 0, hashlib.sha256()
                continue
            raise FetchError(f"{label}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise FetchError(f"{label}: {reason}") from None
        with response:
            return _stream(label, title or label, response, part, progress, hasher,
                           offset, resumed_from, expected_size)
    raise FetchError(f"{label}: the server refused the range request twice")


def _stream(label: str, title: str, response: http.client.HTTPResponse, part: Path,
            progress: Progress, hasher: hashlib._Hash, offset: int, resumed_from: int,
            expected_size: int) -> Fetched:
    status = response.status
    length_header = response.headers.get("Content-Length")
    length = int(length_header) if length_header and length_header.isdigit() else None
    if status == 206 and offset:
        first, total = _range_total(response.headers.get("Content-Range"))
        if first != offset:
            raise FetchError(f"{label}: asked for bytes from {offset}, the server "
                             f"sent Content-Range {response.headers.get('Content-Range')!r}")
        mode = "ab"
        if total is None and length is not None:
            total = offset + length
    elif status == 200:
        # Whole file: either a fresh start or a server that ignores Range.
        offset, resumed_from, hasher = 0, 0, hashlib.sha256()
        mode = "wb"
        total = length
    else:
        raise FetchError(f"{label}: unexpected HTTP status {status}")
    if expected_size and total is not None and total != expected_size:
        part.unlink(missing_ok=True)
        raise FetchError(f"{label}: the server offers {total} bytes, the declaration "
                         f"says size {expected_size}; not downloaded")
    done = offset
    progress.start(title, total or expected_size, done)
    try:
        with part.open(mode) as out:
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (OSError, http.client.HTTPException) as exc:
                    out.flush()
                    why = str(exc) or type(exc).__name__
                    of = total if total is not None else "?"
                    raise FetchError(f"{label}: download interrupted after {done} of {of} "
                                     f"bytes ({why}); run the import again to resume") from None
                if not chunk:
                    break
                out.write(chunk)
                hasher.update(chunk)
                done += len(chunk)
                if expected_size and done > expected_size:
                    out.close()
                    part.unlink(missing_ok=True)
                    raise FetchError(f"{label}: more than the declared {expected_size} "
                                     f"bytes arrived; not kept")
                progress.update(done)
            out.flush()
            os.fsync(out.fileno())
    finally:
        progress.finish()
    if total is not None and done < total:
        raise FetchError(f"{label}: download interrupted after {done} of {total} "
                         f"bytes; run the import again to resume")
    return Fetched(hasher.hexdigest(), done, resumed_from)
