"""Members of tar archives (plain, .gz, .bz2, .xz) and of Debian packages (their data.tar).

Only the members asked for are read, and each is written to the destination the
declaration names, never to a path taken from the archive. A member asked for must be a
regular file; a symbolic or hard link is followed only inside the archive, so a name
with ``..``, an absolute name or a link pointing out of the archive is refused.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
from collections.abc import Callable
from pathlib import Path

AR_MAGIC = b"!<arch>\n"
_MAX_LINKS = 8


class ArchiveError(Exception):
    """A member is missing, unsafe or unreadable; the message names it and the archive."""


def is_deb(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(len(AR_MAGIC)) == AR_MAGIC


def is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


class _Window(io.RawIOBase):
    """A read-only, seekable view of ``size`` bytes of a file starting at ``start``."""

    def __init__(self, f: io.BufferedReader, start: int, size: int) -> None:
        self._f, self._start, self._size, self._pos = f, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, min(base + offset, self._size))
        return self._pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self._size - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._start + self._pos)
        data = self._f.read(n)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        self._f.close()
        super().close()


def _deb_data_tar(path: Path) -> _Window:
    """The ``data.tar.*`` member of a Debian package (an ``ar`` archive)."""
    f = path.open("rb")
    f.seek(len(AR_MAGIC))
    while True:
        header = f.read(60)
        if len(header) < 60:
            f.close()
            raise ArchiveError(f"{path}: Debian package without a data.tar member")
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            f.close()
            raise ArchiveError(f"{path}: damaged ar header for {name!r}") from None
        start = f.tell()
        if name.startswith("data.tar"):
            return _Window(f, start, size)
        f.seek(start + size + (size % 2))


def _clean(member: str, archive: str) -> str:
    name = member.removeprefix("./")
    if member.startswith("/") or ".." in name.split("/") or not name:
        raise ArchiveError(f"{archive}: member {member!r}: names must be relative, "
                           f"without '..'")
    return posixpath.normpath(name)


class TarReader:
    """An open tar archive or Debian package; use as a context manager."""

    def __init__(self, path: Path, label: str = "") -> None:
        self.path = path
        #: How the archive is named in errors (the operator knows the source, not a .part).
        self.label = label or str(path)
        try:
            if is_deb(path):
                self._tar = tarfile.open(fileobj=io.BufferedReader(_deb_data_tar(path)),
                                         mode="r:*")
            else:
                self._tar = tarfile.open(path, mode="r:*")
            self._index = {
                posixpath.normpath(info.name.removeprefix("./").lstrip("/") or "."): info
                for info in self._tar.getmembers()
            }
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ArchiveError(f"{self.label}: not a readable tar archive: {exc}") from None

    def __enter__(self) -> TarReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._tar.close()

    def _resolve(self, member: str) -> tarfile.TarInfo:
        name = _clean(member, self.label)
        for _ in range(_MAX_LINKS + 1):
            info = self._index.get(name)
            if info is None:
                raise ArchiveError(f"{self.label}: member {member!r} not found in the archive")
            if info.isreg():
                return info
            if info.issym():
                target = info.linkname
                resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
            elif info.islnk():
                target = info.linkname
                resolved = posixpath.normpath(target.removeprefix("./"))
            else:
                raise ArchiveError(f"{self.label}: member {member!r} is not a regular file")
            if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
                raise ArchiveError(f"{self.label}: member {member!r} is a link to {target!r}, "
                                   f"outside the archive; refused")
            name = resolved
        raise ArchiveError(f"{self.label}: member {member!r}: too many links")

    def extract(self, member: str, dest: Path,
                on_chunk: Callable[[int], None] | None = None) -> int:
        """Copy one member to ``dest``; return its size."""
        info = self._resolve(member)
        size = 0
        try:
            src = self._tar.extractfile(info)
            if src is None:  # pragma: no cover - isreg() members always have data
                raise ArchiveError(f"{self.label}: member {member!r} has no data")
            with src, dest.open("wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
                    size += len(chunk)
                    if on_chunk:
                        on_chunk(len(chunk))
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ArchiveError(f"{self.label}: member {member!r} cannot be read: {exc}") from None
        return size
