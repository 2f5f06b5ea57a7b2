"""The syslog part: ``run(config, db, stop)`` receives installer logs until told to stop.

One thread, one selector: the UDP socket (debian-installer's busybox ``syslogd -R``,
``logger -d``), and when ``[syslog] tcp`` is on a TCP listener on the same port with its
connections (anaconda's rsyslog forwards with ``@@``, i.e. TCP). Each message is parsed
(``parse.parse``); a malformed one is dropped and counted, never fatal. Parsed lines
are written in batches (``batch.Batcher``); counters are published as part ``syslog``
every ``PUBLISH_EVERY`` seconds and at exit. Stops on SIGTERM/SIGINT (when run in the
main thread) or when ``stop`` is set.
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

from appliance.config import Config
from appliance.db import Database, publish_counters
from appliance.models import utcnow
from appliance.ratelimit import RateLimitedLog
from appliance.stopsignals import stop_on_signals
from appliance.syslog.batch import Batcher, new_counters
from appliance.syslog.parse import MAX_MESSAGE_BYTES, Malformed, StreamFramer, parse

log = logging.getLogger("appliance.syslog")

PUBLISH_EVERY = 5.0
#: Datagrams read per wake-up before the loop looks at its other duties.
UDP_BURST = 256
RCVBUF = 4 * 1024 * 1024
MAX_TCP_CONNECTIONS = 64
#: A TCP connection that sent nothing for this long is closed (a rebooted installer
#: leaves its connection behind).
TCP_IDLE_SECONDS = 3600.0


@dataclass
class _Conn:
    sock: socket.socket
    client: str
    framer: StreamFramer = field(default_factory=StreamFramer)
    last: float = 0.0


class SyslogServer:
    def __init__(self, config: Config, db: Database) -> None:
        self.cfg = config.syslog
        self.db = db
        self.counters = new_counters()
        self.batcher = Batcher(db, self.cfg, self.counters)
        self.sel = selectors.DefaultSelector()
        self.udp: socket.socket | None = None
        self.tcp: socket.socket | None = None
        self.conns: dict[int, _Conn] = {}
        self.warn = RateLimitedLog(log)
        self.published: dict[str, int] | None = None

    def open(self) -> tuple[str, int]:
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        except OSError:
            pass
        udp.bind((self.cfg.bind, self.cfg.port))
        udp.setblocking(False)
        self.udp = udp
        self.sel.register(udp, selectors.EVENT_READ, "udp")
        bound = udp.getsockname()
        if self.cfg.tcp:
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((self.cfg.bind, bound[1]))
            tcp.listen(16)
            tcp.setblocking(False)
            self.tcp = tcp
            self.sel.register(tcp, selectors.EVENT_READ, "listen")
        return bound

    def close(self) -> None:
        for conn in list(self.conns.values()):
            self._drop(conn)
        for sock in (self.udp, self.tcp):
            if sock is not None:
                self.sel.unregister(sock)
                sock.close()
        self.udp = self.tcp = None
        self.sel.close()

    # -- messages --------------------------------------------------------------------
    def handle(self, data: bytes | None, client: str) -> None:
        """One datagram or TCP frame (None: a frame too large to keep)."""
        self.counters["received"] += 1
        try:
            if data is None:
                raise Malformed("oversized")
            now = utcnow()
            self.batcher.add(client, parse(data, now).log_line(at=now))
        except Malformed as exc:
            self.counters["malformed"] += 1
            self.counters[f"malformed_{exc.reason}"] += 1
            self.warn.log(logging.INFO, "dropped malformed syslog message from %s (%s)",
                          client, exc.reason)

    def _read_udp(self) -> None:
        assert self.udp is not None
        for _ in range(UDP_BURST):
            try:
                data, addr = self.udp.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:            # e.g. ECONNREFUSED from an earlier ICMP
                self.warn.log(logging.DEBUG, "syslog UDP receive: %s", exc)
                return
            self.counters["received_udp"] += 1
            self.handle(data, addr[0])

    def _accept(self) -> None:
        assert self.tcp is not None
        try:
            sock, addr = self.tcp.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ECONNABORTED):
                raise
            self.warn.log(logging.WARNING, "syslog TCP accept: %s", exc)
            return
        if len(self.conns) >= MAX_TCP_CONNECTIONS:
            self.counters["tcp_refused"] += 1
            sock.close()
            return
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        conn = _Conn(sock, addr[0], last=time.monotonic())
        self.conns[sock.fileno()] = conn
        self.sel.register(sock, selectors.EVENT_READ, conn)
        self.counters["tcp_connections"] += 1

    def _read_tcp(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            for frame in conn.framer.feed(b"\n"):   # a last line without its newline
                self._tcp_frame(frame, conn.client)
            self._drop(conn)
            return
        conn.last = time.monotonic()
        for frame in conn.framer.feed(data):
            self._tcp_frame(frame, conn.client)

    def _tcp_frame(self, frame: bytes | None, client: str) -> None:
        self.counters["received_tcp"] += 1
        self.handle(frame, client)

    def _drop(self, conn: _Conn) -> None:
        self.conns.pop(conn.sock.fileno(), None)
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    # -- loop ------------------------------------------------------------------------
    def publish(self) -> None:
        values = dict(self.counters)
        if values == self.published:
            return
        try:
            publish_counters(self.db, "syslog", values)
            self.published = values
        except Exception as exc:
            self.warn.log(logging.WARNING, "could not publish syslog counters: %s", exc)

    def serve(self, should_stop) -> None:  # type: ignore[no-untyped-def]
        next_publish = time.monotonic()
        while not should_stop():
            wait = self.batcher.wait_time()
            timeout = 0.2 if wait is None else min(0.2, wait)
            for key, _mask in self.sel.select(timeout):
                try:
                    if key.data == "udp":
                        self._read_udp()
                    elif key.data == "listen":
                        self._accept()
                    else:
                        self._read_tcp(key.data)
                except Exception:
                    self.counters["internal_errors"] += 1
                    self.warn.log(logging.ERROR, "syslog: error handling input",
                                  exc_info=True)
                if self.batcher.due():
                    self.batcher.flush()
            if self.batcher.due():
                self.batcher.flush()
            now = time.monotonic()
            if self.batcher.retention_due():
                self.batcher.retention()
                for conn in [c for c in self.conns.values()
                             if now - c.last > TCP_IDLE_SECONDS]:
                    self._drop(conn)
            if now >= next_publish:
                self.publish()
                next_publish = now + PUBLISH_EVERY
        self.batcher.flush()
        self.publish()


def run(config: Config, db: Database, stop: threading.Event | None = None) -> None:
    """Receive installer syslog on ``[syslog] bind:port`` until a signal or ``stop``."""
    stop = stop if stop is not None else threading.Event()
    server = SyslogServer(config, db)
    with stop_on_signals(stop, "syslog", log):
        try:
            host, port = server.open()
            log.info("syslog receiving installer logs on %s:%d (udp%s, max %d bytes)", host,
                     port, ", tcp" if server.tcp else "", MAX_MESSAGE_BYTES)
            server.serve(stop.is_set)
            log.info("syslog stopped: %s",
                     ", ".join(f"{k}={v}" for k, v in server.counters.items() if v))
        finally:
            server.close()
