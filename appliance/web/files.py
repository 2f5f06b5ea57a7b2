"""Static file responses with HTTP Range support that keep gunicorn's sendfile path.

Werkzeug's own Range handling wraps the file in an iterator, which turns off sendfile.
Here the file is positioned at the range start and handed over as ``wsgi.file_wrapper``
with an exact Content-Length, so gunicorn sends it with ``sendfile(2)`` from that offset.
"""

from __future__ import annotations

import io
import os
import re
import stat
from collections.abc import Callable, Iterator
from email.utils import formatdate
from pathlib import Path

from flask import Response, abort, request
from werkzeug.security import safe_join

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _parse_range(header: str, size: int) -> tuple[int, int] | None | bool:
    """Return (start, end) inclusive, None to serve the whole file, False if unsatisfiable."""
    match = _RANGE.match(header.strip())
    if not match:  # multi-range or malformed: RFC 9110 allows ignoring Range
        return None
    first, last = match.groups()
    if first == "" and last == "":
        return None
    if first == "":  # suffix range: last N bytes
        length = int(last)
        if length == 0:
            return False
        return max(0, size - length), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        return False
    return start, end


def _read_exactly(handle, length: int) -> Iterator[bytes]:  # type: ignore[no-untyped-def]
    """Fallback body for servers without a file wrapper: exactly ``length`` bytes."""
    with handle:
        while length > 0:
            chunk = handle.read(min(length, 1 << 20))
            if not chunk:
                return
            length -= len(chunk)
            yield chunk


class _NotifyingFile(io.FileIO):
    """A file whose ``close`` also calls ``on_close`` (once): the server closes the body
    after its last byte went out (or the client went away), with or without sendfile."""

    def __init__(self, fd: int, on_close: Callable[[], None]) -> None:
        super().__init__(fd, "rb", closefd=True)
        self._on_close: Callable[[], None] | None = on_close

    def close(self) -> None:
        try:
            super().close()
        finally:
            callback, self._on_close = self._on_close, None
            if callback is not None:
                callback()


def send_path(root: Path, relative: str, mimetype: str = "application/octet-stream",
              on_body_closed: Callable[[Response], Callable[[], None] | None] | None = None,
              ) -> Response:
    """Serve ``root/relative`` (never outside ``root``) with Range, HEAD and Last-Modified.

    ``on_body_closed(response)``, when given, is asked before the body goes out for a
    callback to run once it has been sent (or abandoned); it may answer None.
    """
    joined = safe_join(str(root), relative)
    if joined is None:
        abort(404)
    path = Path(joined)
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        abort(404)
    except PermissionError:
        abort(403)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        abort(404)
    handle: io.FileIO | None = None
    try:
        size = st.st_size
        headers = {
            "Accept-Ranges": "bytes",
            "Last-Modified": formatdate(st.st_mtime, usegmt=True),
            "ETag": f'"{st.st_ino:x}-{st.st_size:x}-{int(st.st_mtime_ns):x}"',
        }
        status = 200
        start, length = 0, size
        wanted = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        if wanted and (not if_range or if_range == headers["ETag"]):
            parsed = _parse_range(wanted, size)
            if parsed is False:
                os.close(fd)
                return Response(status=416, headers={**headers,
                                                     "Content-Range": f"bytes */{size}"})
            if parsed:
                start, end = parsed
                length = end - start + 1
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        headers["Content-Length"] = str(length)
        if request.method == "HEAD":
            os.close(fd)
            return Response(status=status, headers=headers, mimetype=mimetype)
        callback = (on_body_closed(Response(status=status, headers=headers))
                    if on_body_closed is not None else None)
        handle = (_NotifyingFile(fd, callback) if callback is not None
                  else io.FileIO(fd, "rb", closefd=True))
        handle.seek(start)
        wrapper_cls = request.environ.get("wsgi.file_wrapper")
        # gunicorn's wrapper: sendfile from the current offset, bounded by Content-Length.
        body = wrapper_cls(handle, 1 << 20) if wrapper_cls else _read_exactly(handle, length)
        return Response(body, status=status, headers=headers, mimetype=mimetype,
                        direct_passthrough=True)
    except BaseException:
        if handle is not None:
            handle.close()
        else:
            os.close(fd)
        raise
