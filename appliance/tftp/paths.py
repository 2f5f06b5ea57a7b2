"""Map a requested TFTP file name to a file under the served root, or refuse it.

The rules, in order:

1. The name is checked lexically first: empty names, NUL bytes, absolute paths
   (``/x``, ``\\x``, ``C:x``) and any ``..`` component are refused before the file
   system is touched. Backslashes count as separators, as Windows PXE clients send them.
2. The remaining name is joined to the root and resolved with ``realpath``. The real
   path must lie inside the (real) root. A symlink inside the root may point elsewhere
   only into one of the ``symlink_targets`` the configuration allows (Debian's ``ipxe``
   package ships ``/usr/lib/ipxe/ipxe.efi`` as a symlink to ``/boot/ipxe.efi``).
3. Only regular files are served: directories, devices, sockets read as "not found".
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

# TFTP error codes (RFC 1350), named as tftpy's TftpErrors does.
FILE_NOT_FOUND = 1
ACCESS_VIOLATION = 2


class Refused(Exception):
    """The request may not be served; ``code`` is the TFTP error code to answer with."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason

    @property
    def is_path_violation(self) -> bool:
        return self.code == ACCESS_VIOLATION


@dataclass(frozen=True)
class Resolved:
    path: str           # real path of the file
    size: int
    st_dev: int
    st_ino: int
    mtime_ns: int


def split_targets(spec: str) -> tuple[str, ...]:
    """``"/boot/ipxe.efi:/srv/x"`` -> real paths; empty entries ignored."""
    return tuple(os.path.realpath(p) for p in spec.split(":") if p.strip())


def _inside(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip(os.sep) + os.sep)


def check_name(name: str) -> list[str]:
    """Lexical checks; returns the name's components. Raises Refused."""
    if not name:
        raise Refused(FILE_NOT_FOUND, "empty file name")
    if "\0" in name:
        raise Refused(ACCESS_VIOLATION, "NUL byte in file name")
    unified = name.replace("\\", "/")
    drive = len(unified) >= 2 and unified[0].isalpha() and unified[1] == ":"
    if unified.startswith("/") or drive:
        raise Refused(ACCESS_VIOLATION, "absolute path")
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise Refused(ACCESS_VIOLATION, "'..' in path")
    if not parts:
        raise Refused(FILE_NOT_FOUND, "no file named")
    return parts


class PathPolicy:
    """Resolves requested names under ``root``; create once, call ``resolve`` per request."""

    def __init__(self, root: str, symlink_targets: tuple[str, ...] = ()) -> None:
        self.root = os.path.realpath(root)
        self.symlink_targets = tuple(os.path.realpath(t) for t in symlink_targets)

    def resolve(self, name: str) -> Resolved:
        parts = check_name(name)
        joined = os.path.join(self.root, *parts)
        real = os.path.realpath(joined)
        if not _inside(real, self.root) and not any(
                _inside(real, t) for t in self.symlink_targets):
            raise Refused(ACCESS_VIOLATION, f"resolves outside the root ({real})")
        try:
            st = os.stat(real)
        except FileNotFoundError:
            raise Refused(FILE_NOT_FOUND, "no such file") from None
        except PermissionError:
            raise Refused(ACCESS_VIOLATION, "permission denied") from None
        except OSError as exc:
            raise Refused(FILE_NOT_FOUND, f"cannot stat: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise Refused(FILE_NOT_FOUND, "not a regular file")
        return Resolved(real, st.st_size, st.st_dev, st.st_ino, st.st_mtime_ns)
