"""Members of an ISO 9660 image (installer ISOs: ``casper/vmlinuz``, ``images/pxeboot/...``).

Read with pycdlib, pure Python, no loop mount and no root. Names are looked up the way a
reader of the ISO sees them: Rock Ridge first (Ubuntu and EL ISOs), then Joliet, then
the plain ISO 9660 names (upper case, ``;1`` versions) matched without case or version.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, Any

ISO_MAGIC_OFFSET = 0x8001


class IsoError(Exception):
    """A member is missing or cannot be read; the message names the member and the ISO."""


def is_iso(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(ISO_MAGIC_OFFSET)
        return f.read(5) == b"CD001"


def _plain_name(identifier: bytes) -> str:
    name = identifier.decode("ascii", "replace").split(";", 1)[0]
    return name.rstrip(".").lower()


class IsoReader:
    """An open ISO; use as a context manager."""

    def __init__(self, path: Path, label: str = "") -> None:
        import pycdlib
        from pycdlib.pycdlibexception import PyCdlibException

        self.path = path
        #: How the archive is named in errors (the operator knows the source, not a .part).
        self.label = label or str(path)
        self._error: type[Exception] = PyCdlibException
        self._iso = pycdlib.PyCdlib()
        try:
            self._iso.open(str(path))
        except (PyCdlibException, OSError) as exc:
            raise IsoError(f"{self.label}: not a readable ISO 9660 image: {exc}") from None

    def __enter__(self) -> IsoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._iso.close()
        except self._error:
            pass

    def _lookups(self, member: str) -> Iterator[dict[str, str]]:
        path = "/" + member.strip("/")
        if self._iso.has_rock_ridge():
            yield {"rr_path": path}
        if self._iso.has_joliet():
            yield {"joliet_path": path}
        found = self._plain_path(member)
        if found:
            yield {"iso_path": found}

    def _plain_path(self, member: str) -> str | None:
        """The ISO 9660 path whose components match ``member`` without case or ``;1``."""
        current = "/"
        for part in PurePosixPath(member.strip("/")).parts:
            match = None
            try:
                children = list(self._iso.list_children(iso_path=current))
            except self._error:
                return None
            for child in children:
                if child is None or child.is_dot() or child.is_dotdot():
                    continue
                if _plain_name(child.file_identifier()) == part.lower():
                    match = child.file_identifier().decode("ascii", "replace")
                    break
            if match is None:
                return None
            current = current.rstrip("/") + "/" + match
        return current

    def _record(self, member: str) -> tuple[Any, dict[str, str]]:
        for kwargs in self._lookups(member):
            try:
                record = self._iso.get_record(**kwargs)
            except self._error:
                continue
            return record, kwargs
        raise IsoError(f"{self.label}: member {member!r} not found in the ISO")

    @contextmanager
    def open_member(self, member: str) -> Iterator[IO[bytes]]:
        record, kwargs = self._record(member)
        if record.is_dir():
            raise IsoError(f"{self.label}: member {member!r} is a directory, not a file")
        if "rr_path" in kwargs and record.is_symlink():
            raise IsoError(f"{self.label}: member {member!r} is a symbolic link; name the "
                           f"file it points to")
        try:
            with self._iso.open_file_from_iso(**kwargs) as f:
                yield f
        except self._error as exc:
            raise IsoError(f"{self.label}: member {member!r} cannot be read: {exc}") from None

    def extract(self, member: str, dest: Path,
                on_chunk: Callable[[int], None] | None = None) -> int:
        """Copy one member to ``dest``; return its size."""
        size = 0
        with self.open_member(member) as src, dest.open("wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
                size += len(chunk)
                if on_chunk:
                    on_chunk(len(chunk))
        return size
