"""The TFTP event loop of one worker: read requests on the well-known port, run transfers.

What tftpy does here and what it does not:

* tftpy's ``TftpPacketFactory`` parses every datagram that arrives on the well-known
  port (RRQ/WRQ with their options); tftpy's ``TftpPacketOACK`` and ``TftpPacketERR``
  encode every OACK and ERROR we send.
* The data path (DATA out, ACK in) does not go through tftpy's ``TftpServer`` /
  ``TftpContextServer`` / ``TftpStates``. Measured (bench/tftp/README.md), the stock
  server is a ``select()`` loop that rebuilds its socket list and searches its
  sessions linearly for each packet, formats several log strings per packet even
  when they are not emitted, re-reads the file per block and crashes its loop on
  some malformed input (non-ASCII names, non-numeric blksize, a directory name). Here
  one ``epoll`` loop owns all transfers; each transfer has a connected UDP socket on
  an ephemeral port (its TID); a DATA packet is a 4-byte header plus a slice of the
  file held in memory; the expected ACK is recognised by one bytes comparison.

Nothing here touches the database: counters are a plain dict, exported by the caller.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence

from tftpy.TftpPacketFactory import TftpPacketFactory
from tftpy.TftpPacketTypes import TftpPacketERR, TftpPacketRRQ, TftpPacketWRQ

from appliance.config import TftpConfig
from appliance.tftp.files import FileCache
from appliance.tftp.options import encode_oack, negotiate
from appliance.tftp.paths import ACCESS_VIOLATION, PathPolicy, Refused, split_targets

log = logging.getLogger("appliance.tftp")

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)      # Linux value; not exported by Python 3.11
_PKTINFO = struct.Struct("=i4s4s")                  # struct in_pktinfo
_CMSG_LEN = socket.CMSG_SPACE(_PKTINFO.size)
_ACK = struct.Struct("!HH")
#: The ACK datagram for each block number, so the hot path compares bytes, not fields.
_ACKS = [_ACK.pack(4, n) for n in range(65536)]

#: RFC 2347: a request, options included, fits in 512 octets. Larger ones are dropped.
MAX_REQUEST = 512
OP_RRQ, OP_WRQ, OP_DATA, OP_ACK, OP_ERROR = 1, 2, 3, 4, 5
ILLEGAL_OPERATION = 4
#: Seconds between two passes over the running transfers for retransmit timers.
TIMER_INTERVAL = 0.05
#: Ended transfers kept for the boot timeline until the supervisor takes them.
FINISHED_KEPT = 1000

COUNTER_NAMES = (
    "requests",              # well-formed RRQ/WRQ received
    "transfers_started",
    "transfers_completed",
    "transfers_failed",      # timed out, socket/send error, or cut by shutdown
    "transfers_aborted_by_client",  # the client sent ERROR during the data transfer
    "tsize_probes",          # the client sent ERROR in answer to our OACK: it only wanted
                             # the size (tsize), as UEFI firmware (OVMF) does; not a failure
    "bytes_sent",            # DATA payload bytes, retransmissions included
    "retransmits",
    "refused_paths",         # outside the root, absolute, '..', NUL: access violation
    "refused_writes",        # WRQ on this read-only server
    "not_found",
    "bad_requests",          # well-formed but unserviceable (e.g. mode "mail")
    "malformed_dropped",     # truncated, oversized, garbage or stray datagrams
)


def new_counters() -> dict[str, int]:
    return dict.fromkeys(COUNTER_NAMES, 0)


def error_packet(code: int, message: str | None = None) -> bytes:
    """An ERROR datagram, encoded by tftpy (optionally with our own message)."""
    pkt = TftpPacketERR()
    pkt.errorcode = code
    if message is not None or code not in pkt.errmsgs:
        pkt.errmsgs = {**pkt.errmsgs, code: (message or "Error").encode("ascii", "replace")}
    return pkt.encode().buffer


class RateLimitedLog:
    """At most one record per ``interval`` seconds per key; the rest are counted."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) >= self.interval:
            n = self._suppressed.pop(key, 0)
            self._last[key] = now
            if n:
                log.warning(msg + " (%d similar suppressed)", *args, n)
            else:
                log.warning(msg, *args)
        else:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1


class Transfer:
    """One read transfer. ``block`` is the block awaiting its ACK (0: the OACK)."""

    __slots__ = ("sock", "fd", "peer", "name", "packets", "size", "blksize", "nblocks",
                 "block", "oack", "sent_at", "timeout", "tries", "started", "resent_bytes",
                 "seen_block", "tsize_asked")

    def __init__(self, sock: socket.socket, peer: tuple[str, int], name: str,
                 packets: Sequence[bytes], size: int, blksize: int, timeout: float,
                 oack: bytes | None) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.name = name
        self.packets = packets
        self.size = size
        self.blksize = blksize
        # The last block is always shorter than blksize, possibly empty.
        self.nblocks = len(packets)
        self.oack = oack
        self.block = 0 if oack is not None else 1
        # The retransmit timer (see Engine._check_timeouts): ``sent_at`` is when the
        # timer last saw ``block`` change (or when we (re)sent it), ``seen_block`` the
        # block it saw then. The data path itself only advances ``block``.
        self.sent_at = 0.0
        self.seen_block = self.block
        self.timeout = timeout
        self.tries = 0
        self.started = time.monotonic()
        self.resent_bytes = 0
        self.tsize_asked = False

    def payload_sent(self) -> int:
        """DATA payload bytes sent, retransmissions included."""
        first_pass = min(self.size, max(0, self.block) * self.blksize)
        return first_pass + self.resent_bytes


class Engine:
    """Serves TFTP read requests on one socket until ``should_stop()`` is true."""

    def __init__(self, cfg: TftpConfig, reuse_port: bool = False) -> None:
        self.cfg = cfg
        self.reuse_port = reuse_port
        self.policy = PathPolicy(cfg.root, split_targets(cfg.symlink_targets))
        self.files = FileCache()
        self.factory = TftpPacketFactory()
        self.counters = new_counters()
        self.transfers: dict[int, Transfer] = {}
        self.by_peer: dict[tuple[str, int], Transfer] = {}
        self.ratelog = RateLimitedLog()
        self.sock: socket.socket | None = None
        self.epoll: select.epoll | None = None
        self._stop_fds: set[int] = set()
        self.bound: tuple[str, int] | None = None
        #: Ended transfers (not size probes) for the boot timeline, taken by the caller
        #: with ``take_finished``; the oldest are dropped when nobody takes them.
        self.finished: deque[dict[str, object]] = deque(maxlen=FINISHED_KEPT)

    # ---- setup -------------------------------------------------------------------------

    def open(self) -> tuple[str, int]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind((self.cfg.bind, self.cfg.port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.epoll = select.epoll()
        self.epoll.register(sock.fileno(), select.EPOLLIN)
        self.bound = sock.getsockname()
        return self.bound

    def watch_for_eof(self, fd: int) -> None:
        """Stop serving when ``fd`` (e.g. a pipe from a supervisor) becomes readable/EOF."""
        assert self.epoll is not None
        self.epoll.register(fd, select.EPOLLIN | select.EPOLLHUP)
        self._stop_fds.add(fd)

    def close(self) -> None:
        for t in list(self.transfers.values()):
            self._finish(t, ok=False, why="server shutting down")
        if self.epoll is not None:
            self.epoll.close()
            self.epoll = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.files.clear()

    # ---- the loop ----------------------------------------------------------------------

    def serve(self, should_stop: Callable[[], bool],
              on_tick: Callable[[], None] | None = None, tick: float = 1.0) -> None:
        """The loop. The common case (the expected ACK arrives, the next block goes out)
        is handled inline: one ``read``, one bytes comparison, one ``write`` and one
        attribute store per block; the clock is read once per ``epoll_wait``, and
        retransmit timers are looked after every TIMER_INTERVAL, not per packet."""
        assert self.sock is not None and self.epoll is not None
        lfd = self.sock.fileno()
        transfers = self.transfers
        poll = self.epoll.poll
        read, write = os.read, os.write
        acks = _ACKS
        stop_fds = self._stop_fds
        other_packet = self._other_packet
        finish = self._finish
        monotonic = time.monotonic
        next_scan = next_tick = monotonic()
        while not should_stop():
            for fd, _ev in poll(TIMER_INTERVAL):
                try:
                    t = transfers[fd]
                except KeyError:
                    if fd == lfd:
                        self._read_requests()
                    elif fd in stop_fds:
                        return
                    continue
                try:
                    pkt = read(fd, 256)          # an ACK is 4 bytes; ERROR text is cut
                except BlockingIOError:
                    continue
                except OSError as exc:           # ICMP port unreachable and the like
                    finish(t, ok=False, why=f"socket error: {exc.strerror}")
                    continue
                block = t.block
                if pkt != acks[block & 0xFFFF] and not other_packet(t, pkt):
                    continue
                if block >= t.nblocks:
                    finish(t, ok=True)
                    continue
                t.block = block + 1
                try:
                    write(fd, t.packets[block])
                except BlockingIOError:
                    pass                          # counts as lost; the timer resends
                except OSError as exc:
                    finish(t, ok=False, why=f"send failed: {exc.strerror}")
            now = monotonic()
            if now >= next_scan:
                next_scan = now + TIMER_INTERVAL
                if transfers:
                    self._check_timeouts(now)
            if on_tick is not None and now >= next_tick:
                next_tick = now + tick
                on_tick()

    # ---- data path, slow cases ---------------------------------------------------------

    def _other_packet(self, t: Transfer, pkt: bytes) -> bool:
        """Anything but the exact expected ACK: stale/duplicate ACKs, ERROR, garbage.
        True if it is the expected ACK after all (with trailing bytes)."""
        if len(pkt) < 4:
            self.counters["malformed_dropped"] += 1
            return False
        if pkt[:4] == _ACKS[t.block & 0xFFFF]:
            return True
        op, _blk = _ACK.unpack_from(pkt)
        if op == OP_ACK:
            # A duplicate or stale ACK. Ignoring it (and waiting for our own timeout) is
            # what avoids the Sorcerer's Apprentice bug (RFC 1123 4.2.3.1).
            return False
        if op == OP_ERROR:
            self._client_error(t, pkt)
            return False
        self.counters["malformed_dropped"] += 1
        return False

    def _client_error(self, t: Transfer, pkt: bytes) -> None:
        """The client ended the transfer with an ERROR: its decision, not our failure.

        An ERROR in answer to our OACK from a client that asked for ``tsize`` is a size
        probe: UEFI firmware (OVMF's PXE code) requests a file with tsize, reads the size
        from the OACK and aborts with ERROR 8 "User aborted the transfer", then requests
        the file again for real. Counted as ``tsize_probes`` and logged at DEBUG.
        Any other client ERROR is counted as ``transfers_aborted_by_client`` (INFO).
        """
        text = _err_text(pkt)
        if t.block == 0 and t.tsize_asked:
            self._finish(t, ok=False, why=f"client sent ERROR {text} after the OACK",
                         kind="tsize_probes")
        else:
            self._finish(t, ok=False, why=f"client sent ERROR {text}",
                         kind="transfers_aborted_by_client")

    def _send_current(self, t: Transfer, now: float | None = None) -> None:
        """(Re)send what the transfer is waiting to have acknowledged."""
        datagram = t.oack if t.block == 0 else t.packets[t.block - 1]
        assert datagram is not None
        t.sent_at = time.monotonic() if now is None else now
        t.seen_block = t.block
        try:
            os.write(t.fd, datagram)
        except BlockingIOError:
            pass
        except OSError as exc:
            self._finish(t, ok=False, why=f"send failed: {exc.strerror}")

    def _check_timeouts(self, now: float) -> None:
        """One pass over the running transfers, every TIMER_INTERVAL (not per packet).

        The data path does not stamp each block with the time; instead a transfer whose
        ``block`` moved since the last pass restarts its timer here. So a block is
        retransmitted between ``timeout`` and ``timeout + 2 * TIMER_INTERVAL`` after it
        was sent, and the per-block cost of timers is nil. A pass costs ~0.1 us per
        transfer (1,000 transfers: ~0.1 ms every 50 ms).
        """
        expired = None
        for t in self.transfers.values():
            block = t.block
            if block != t.seen_block:
                t.seen_block = block
                t.sent_at = now
                t.tries = 0
            elif now - t.sent_at >= t.timeout:
                if expired is None:
                    expired = [t]
                else:
                    expired.append(t)
        if expired is None:
            return
        retries = self.cfg.retries
        for t in expired:
            if t.tries >= retries:
                self._finish(t, ok=False, why=f"no ACK for block {t.block} after "
                             f"{t.tries + 1} tries")
                continue
            t.tries += 1
            self.counters["retransmits"] += 1
            if t.block > 0:
                t.resent_bytes += len(t.packets[t.block - 1]) - 4
            self._send_current(t, now)

    def _finish(self, t: Transfer, ok: bool, why: str = "",
                kind: str = "transfers_failed") -> None:
        if self.transfers.pop(t.fd, None) is None:
            return
        self.by_peer.pop(t.peer, None)
        if self.epoll is not None:
            try:
                self.epoll.unregister(t.fd)
            except OSError:
                pass
        t.sock.close()
        took = time.monotonic() - t.started
        self.counters["bytes_sent"] += t.payload_sent()
        if kind != "tsize_probes":
            self.finished.append({"client": t.peer[0], "file": t.name, "bytes": t.size,
                                  "seconds": round(took, 3), "ok": ok, "why": why,
                                  "end": time.time()})
        if ok:
            self.counters["transfers_completed"] += 1
            log.info("sent %s to %s:%d: %d bytes, blksize %d, %.3f s", t.name, t.peer[0],
                     t.peer[1], t.size, t.blksize, took)
        elif kind == "tsize_probes":
            self.counters[kind] += 1
            log.debug("size probe of %s by %s:%d (tsize %d): %s", t.name, t.peer[0],
                      t.peer[1], t.size, why)
        elif kind == "transfers_aborted_by_client":
            self.counters[kind] += 1
            log.info("transfer of %s to %s:%d aborted by the client at block %d after "
                     "%.3f s: %s", t.name, t.peer[0], t.peer[1], t.block, took, why)
        else:
            self.counters["transfers_failed"] += 1
            log.warning("transfer of %s to %s:%d failed after %.3f s: %s", t.name, t.peer[0],
                        t.peer[1], took, why)
        t.packets = ()

    def take_finished(self) -> list[dict[str, object]]:
        """The ended transfers not taken yet (safe to call from another thread)."""
        taken = []
        while self.finished:
            try:
                taken.append(self.finished.popleft())
            except IndexError:
                break
        return taken

    # ---- requests on the well-known port -----------------------------------------------

    def _read_requests(self) -> None:
        assert self.sock is not None
        for _ in range(64):
            try:
                pkt, anc, flags, addr = self.sock.recvmsg(65536, _CMSG_LEN)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("recvmsg on the listening socket: %s", exc)
                return
            local = self.cfg.bind
            for level, kind, data in anc:
                if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
                    _ifindex, spec_dst, _dst = _PKTINFO.unpack_from(data)
                    local = socket.inet_ntoa(spec_dst)
            try:
                self._handle_request(pkt, flags, addr, local)
            except Exception:                     # a bug must not take the server down
                self.counters["malformed_dropped"] += 1
                log.exception("unexpected error handling a request from %s:%d", *addr)

    def _drop(self, addr: tuple[str, int], why: str) -> None:
        self.counters["malformed_dropped"] += 1
        self.ratelog.warning("drop", "dropped datagram from %s:%d: %s", addr[0], addr[1], why)

    def _handle_request(self, pkt: bytes, flags: int, addr: tuple[str, int],
                        local: str) -> None:
        if flags & socket.MSG_TRUNC or len(pkt) > MAX_REQUEST:
            return self._drop(addr, f"oversized ({len(pkt)} bytes)")
        if len(pkt) < 4:
            return self._drop(addr, f"truncated ({len(pkt)} bytes)")
        op = (pkt[0] << 8) | pkt[1]
        if op not in (OP_RRQ, OP_WRQ):
            return self._drop(addr, f"opcode {op} on the request port")
        if pkt[-1] != 0:
            return self._drop(addr, "request not NUL-terminated")
        try:
            req = self.factory.parse(pkt)
        except Exception as exc:                  # tftpy raises struct/Unicode/Tftp errors
            return self._drop(addr, f"unparsable request ({exc.__class__.__name__})")
        if addr in self.by_peer:
            return                                # a retransmitted RRQ: already serving it
        self.counters["requests"] += 1
        if isinstance(req, TftpPacketWRQ):
            self.counters["refused_writes"] += 1
            log.warning("refused write of %r from %s:%d (read-only server)",
                        req.filename, *addr)
            return self._reply_error(local, addr, ACCESS_VIOLATION, "Server is read-only")
        assert isinstance(req, TftpPacketRRQ)
        mode = req.mode
        if mode not in ("octet", "netascii"):
            self.counters["bad_requests"] += 1
            log.warning("refused %r from %s:%d: transfer mode %r", req.filename, *addr, mode)
            return self._reply_error(local, addr, ILLEGAL_OPERATION, "Unsupported mode")
        try:
            resolved = self.policy.resolve(req.filename)
        except Refused as exc:
            if exc.is_path_violation:
                self.counters["refused_paths"] += 1
                log.warning("refused %r from %s:%d: %s", req.filename, addr[0], addr[1],
                            exc.reason)
            else:
                self.counters["not_found"] += 1
                log.info("not found: %r from %s:%d (%s)", req.filename, addr[0], addr[1],
                         exc.reason)
            return self._reply_error(local, addr, exc.code)
        netascii = mode == "netascii"
        try:
            size = len(self.files.get(resolved, netascii))
            neg = negotiate(req.options or {}, size, self.cfg.max_blksize)
            packets = self.files.datagrams(resolved, netascii, neg.blksize)
        except OSError as exc:
            self.counters["not_found"] += 1
            log.warning("cannot read %s for %s:%d: %s", resolved.path, addr[0], addr[1],
                        exc.strerror)
            return self._reply_error(local, addr, ACCESS_VIOLATION)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((local, 0))
            sock.connect(addr)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            log.warning("cannot open a transfer socket to %s:%d: %s", *addr, exc)
            return
        t = Transfer(sock, addr, req.filename, packets, size, neg.blksize,
                     neg.timeout or self.cfg.timeout,
                     encode_oack(neg.accepted) if neg.accepted else None)
        t.tsize_asked = "tsize" in neg.accepted
        assert self.epoll is not None
        self.epoll.register(t.fd, select.EPOLLIN)
        self.transfers[t.fd] = t
        self.by_peer[addr] = t
        self.counters["transfers_started"] += 1
        log.debug("RRQ %r from %s:%d mode %s options %s", req.filename, addr[0], addr[1],
                  mode, neg.accepted)
        self._send_current(t)

    def _reply_error(self, local: str, addr: tuple[str, int], code: int,
                     message: str | None = None) -> None:
        """Answer from a fresh ephemeral port, as a transfer would (RFC 1350 TIDs)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((local, 0))
            sock.sendto(error_packet(code, message), addr)
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH):
                log.debug("cannot send ERROR to %s:%d: %s", addr[0], addr[1], exc)
        finally:
            sock.close()


def _err_text(pkt: bytes) -> str:
    code = (pkt[2] << 8) | pkt[3]
    msg = pkt[4:].split(b"\0", 1)[0].decode("ascii", "replace")[:100]
    return f"{code} {msg!r}"


def worker_count(cfg: TftpConfig) -> int:
    return cfg.workers if cfg.workers > 0 else max(1, os.cpu_count() or 1)
