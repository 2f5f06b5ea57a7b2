"""File contents for transfers: each file is mapped once and shared by every transfer.

A file is read into memory once (files above ``MMAP_THRESHOLD`` are memory-mapped
instead, so a large image costs page cache, not heap) and kept while any transfer uses
it or while it is among the recently used. Reading small files rather than mapping
them means an administrator rewriting a boot loader in place cannot make a running
transfer fault (SIGBUS) on a truncated mapping. A changed file (inode, size or mtime
differ) is loaded afresh; transfers already running keep the old copy until they end.

``netascii`` transfers get the translated bytes (LF -> CR LF, CR -> CR NUL, RFC 764),
computed once per file version.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections import OrderedDict
from collections.abc import Sequence

from appliance.tftp.paths import Resolved

_EMPTY = memoryview(b"")
MMAP_THRESHOLD = 64 * 1024 * 1024
#: Prebuilt DATA datagrams are kept for files up to this size, in total up to PACKED_BUDGET.
PACK_THRESHOLD = 64 * 1024 * 1024
PACKED_BUDGET = 256 * 1024 * 1024
_DAT = struct.Struct("!HH")


def to_netascii(data: bytes) -> bytes:
    return data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


class FileCache:
    """Shared read-only views of served files, keyed by file identity."""

    def __init__(self, keep: int = 64) -> None:
        self.keep = keep
        self._entries: OrderedDict[tuple, memoryview] = OrderedDict()
        self._packed: OrderedDict[tuple, tuple[list[bytes], int]] = OrderedDict()
        self._packed_bytes = 0

    def get(self, res: Resolved, netascii: bool = False) -> memoryview:
        key = (res.st_dev, res.st_ino, res.size, res.mtime_ns, netascii)
        view = self._entries.get(key)
        if view is not None:
            self._entries.move_to_end(key)
            return view
        view = self._load(res, netascii)
        self._entries[key] = view
        while len(self._entries) > self.keep:
            # Dropping our reference is enough: a running transfer holds its own view,
            # and the mapping goes away with the last view.
            self._entries.popitem(last=False)
        return view

    @staticmethod
    def _load(res: Resolved, netascii: bool) -> memoryview:
        fd = os.open(res.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                data: memoryview = _EMPTY
            elif size <= MMAP_THRESHOLD:
                chunks = []
                while True:
                    chunk = os.read(fd, 1 << 20)
                    if not chunk:
                        break
                    chunks.append(chunk)
                data = memoryview(b"".join(chunks))
            else:
                data = memoryview(mmap.mmap(fd, size, prot=mmap.PROT_READ))
        finally:
            os.close(fd)
        if netascii:
            return memoryview(to_netascii(bytes(data)))
        return data

    def datagrams(self, res: Resolved, netascii: bool, blksize: int) -> Sequence[bytes]:
        """Every DATA datagram of the file at ``blksize``, header included, by block - 1.

        Built once per file version and block size, so sending a block is one ``write``
        of a ready bytes object. Large files get a lazy sequence that builds each
        datagram as it is sent.
        """
        view = self.get(res, netascii)
        if len(view) > PACK_THRESHOLD:
            return LazyDatagrams(view, blksize)
        key = (res.st_dev, res.st_ino, res.size, res.mtime_ns, netascii, blksize)
        entry = self._packed.get(key)
        if entry is not None:
            self._packed.move_to_end(key)
            return entry[0]
        packets = build_datagrams(view, blksize)
        self._packed[key] = (packets, len(view))
        self._packed_bytes += len(view)
        while self._packed_bytes > PACKED_BUDGET and len(self._packed) > 1:
            _, (_, size) = self._packed.popitem(last=False)
            self._packed_bytes -= size
        return packets

    def clear(self) -> None:
        self._entries.clear()
        self._packed.clear()
        self._packed_bytes = 0


def build_datagrams(view: memoryview, blksize: int) -> list[bytes]:
    """DATA datagrams for ``view``: blocks 1..n, the last shorter than blksize (maybe empty)."""
    pack = _DAT.pack
    n = len(view) // blksize + 1
    return [pack(3, (i + 1) & 0xFFFF) + view[i * blksize:(i + 1) * blksize] for i in range(n)]


class LazyDatagrams(Sequence[bytes]):
    """The same as build_datagrams() without holding them all: for very large files."""

    def __init__(self, view: memoryview, blksize: int) -> None:
        self.view = view
        self.blksize = blksize
        self.n = len(view) // blksize + 1

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):  # type: ignore[no-untyped-def, override]
        if not 0 <= i < self.n:
            raise IndexError(i)
        bs = self.blksize
        return _DAT.pack(3, (i + 1) & 0xFFFF) + self.view[i * bs:(i + 1) * bs]
