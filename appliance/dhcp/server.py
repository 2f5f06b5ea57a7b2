"""The DHCP part: ``run(config, db, stop)`` serves until SIGTERM/SIGINT or ``stop``.

One thread does everything: it empties the sockets into two queues, answers REQUESTs
before DISCOVERs (finishing an exchange beats starting a new one), writes the lease
changes of a chunk of REQUESTs in one transaction (group commit) and only then sends
their ACKs, so a sent ACK is durable; under overload it answers the newest DISCOVERs and
lets the old ones age out instead of falling behind. Between chunks it does the other
database work in small slices.

Why one thread: a second thread that commits or sends would have to win the GIL back
from the busy packet loop at every system call (up to the 5 ms switch interval each
time), which under load delays ACKs by far more than the commit itself costs.
"""

from __future__ import annotations

import logging
import select
import signal
import threading
import time
from collections import deque
from typing import Any

from appliance.config import Config
from appliance.db import Database
from appliance.dhcp.background import Housekeeper, SeenRecorder
from appliance.dhcp.codec import DropPacket, MalformedPacket, OversizedPacket, decode, int_to_ip
from appliance.dhcp.codec import peek_message_type as peek
from appliance.dhcp.handler import HandlerConfig, ServerHandler
from appliance.dhcp.leases import LeaseTable, SubnetInfo
from appliance.dhcp.options import DISCOVER, MESSAGE_NAMES, PXE_PORT, REQUEST
from appliance.dhcp.packets import Incoming, Outgoing
from appliance.dhcp.proxy import ProxyHandler
from appliance.dhcp.stats import Counters, RateLimitedLog
from appliance.dhcp.steering import SteeringConfig
from appliance.dhcp.store import (
    lease_row,
    load_leases,
    load_subnets,
    subnet_signature,
    write_leases,
)
from appliance.dhcp.transport import Transport

log = logging.getLogger("appliance.dhcp")

#: Datagrams read per socket per loop iteration at most: enough to empty the socket
#: under any load, so the backlog is judged (and shed) here rather than queued.
MAX_BATCH = 32768
#: A DISCOVER older than this is not answered: its exchange would finish too late.
DISCOVER_MAX_AGE = 0.5
#: A REQUEST older than this is not answered.
REQUEST_MAX_AGE = 3.0
#: Share of the time database housekeeping may take while packets keep coming.
HOUSEKEEPING_SHARE = 0.1
#: Packets of each kind answered per loop iteration: bounds the bursts of replies (a
#: client's receive buffer holds only so many) and the wait of new REQUESTs.
CHUNK = 64
#: DISCOVERs waiting beyond this are dropped, oldest first.
MAX_QUEUED_DISCOVERS = 20000


class DhcpServer:
    """The packet loop and its helpers; ``run()`` below is the part's entry point."""

    def __init__(self, config: Config, db: Database) -> None:
        self.config = config
        self.db = db
        self.counters = Counters()
        self.proxy_mode = config.dhcp.mode == "proxy"
        self.recorder = SeenRecorder(self.counters)
        hcfg = HandlerConfig(
            steering=SteeringConfig(config.dhcp.bios_loader, config.dhcp.uefi_loader,
                                    config.http.port),
            public_address=config.http.public_address,
            offer_hold_seconds=config.dhcp.offer_hold_seconds,
        )
        self.table = LeaseTable()
        self.handler: ServerHandler | ProxyHandler
        if self.proxy_mode:
            self.handler = ProxyHandler(hcfg, self.counters, self.recorder)
        else:
            self.handler = ServerHandler(self.table, hcfg, self.counters, self.recorder)
        self.malformed_log = RateLimitedLog(log)
        self.error_log = RateLimitedLog(log)
        self.pending_subnets: list[SubnetInfo] | None = None
        self.requests: deque[Incoming] = deque()
        self.discovers: deque[Incoming] = deque()
        self.transport: Transport | None = None
        self.housekeeper: Housekeeper | None = None

    # -- start / stop ---------------------------------------------------------------
    def start(self) -> None:
        signature: Any = None
        if not self.proxy_mode:
            signature = subnet_signature(self.db)
            subnets = load_subnets(self.db)
            self.table.set_subnets(subnets)
            n = load_leases(self.db, self.table)
            log.info("DHCP server: %d subnet(s), %d lease record(s) loaded",
                     len(subnets), n)
            if not subnets:
                log.warning("no subnet configured: handing out no addresses")
        else:
            log.info("proxyDHCP mode: answering PXE clients only, handing out no addresses")
        ports = [self.config.dhcp.port]
        if self.proxy_mode:
            ports.append(PXE_PORT)
        self.transport = Transport(self.config.dhcp.bind, ports, self.config.dhcp.interface)
        self.housekeeper = Housekeeper(self.db, self.counters, self.recorder,
                                       None if self.proxy_mode else self._set_subnets,
                                       signature=signature)


    def close(self) -> None:
        if self.housekeeper is not None:
            self.housekeeper.final()
        if self.transport is not None:
            self.transport.close()
        log.info("DHCP stopped: %s", {k: v for k, v in self.counters.items() if v})

    def _set_subnets(self, subnets: list[SubnetInfo]) -> None:
        self.pending_subnets = subnets  # picked up by the packet loop

    def commit(self, now: float) -> bool:
        """Write the lease changes made so far in one transaction; False if it failed."""
        dirty = self.table.take_dirty()
        if not dirty:
            return True
        try:
            write_leases(self.db, [lease_row(e, now) for e in dirty])
        except Exception:
            self.counters["db_errors"] += 1
            self.error_log.log(logging.ERROR, "could not store %d lease change(s); their "
                               "ACKs are not sent", len(dirty), exc_info=True)
            return False
        self.counters["db_commits"] += 1
        return True

    # -- sending ---------------------------------------------------------------------
    def send_all(self, outs: list[Outgoing]) -> None:
        assert self.transport is not None
        send = self.transport.send
        for out in outs:
            try:
                send(out)
                self.counters["sent"] += 1
            except OSError as exc:
                self.counters.inc("send_errors")
                self.error_log.log(logging.WARNING, "could not send reply to %s:%d: %s",
                                   int_to_ip(out.dst_ip), out.dst_port, exc)

    # -- the loop ----------------------------------------------------------------------
    def serve(self, stop: threading.Event) -> None:
        assert self.transport is not None and self.housekeeper is not None
        poller = select.poll()
        ports_by_fd = {}
        for port, sock in self.transport.socks.items():
            poller.register(sock.fileno(), select.POLLIN)
            ports_by_fd[sock.fileno()] = port
        allowance, last = 0.0, time.monotonic()
        while not stop.is_set():
            if self.pending_subnets is not None:
                subnets, self.pending_subnets = self.pending_subnets, None
                self.table.set_subnets(subnets)
                log.info("subnets reloaded: %s", ", ".join(s.cidr for s in subnets) or "none")
            pending = bool(self.requests or self.discovers)
            events = poller.poll(0 if pending else 200)
            if events:
                batch: list[Incoming] = []
                for fd, _ev in events:
                    self.transport.drain(ports_by_fd[fd], batch, MAX_BATCH)
                self.intake(batch)
            if self.requests or self.discovers:
                self.work()
            # Other database work: when quiet, a good slice; while packets flow, at most
            # HOUSEKEEPING_SHARE of the time, so registering a flood of new machines
            # never slows the answers down.
            now = time.monotonic()
            allowance = min(allowance + HOUSEKEEPING_SHARE * (now - last), 0.05)
            last = now
            busy = events or self.requests or self.discovers
            budget = 0.05 if not busy else (allowance if allowance >= 0.003 else 0.0)
            allowance -= self.housekeeper.idle(budget)

    def intake(self, batch: list[Incoming]) -> None:
        """Queue what was drained: DISCOVERs apart from everything else."""
        self.counters["received"] += len(batch)
        requests, discovers = self.requests, self.discovers
        for rx in batch:
            if peek(rx.data) == DISCOVER:
                discovers.append(rx)
            else:
                requests.append(rx)  # REQUEST and everything else, in arrival order
        if len(discovers) > MAX_QUEUED_DISCOVERS:
            excess = len(discovers) - MAX_QUEUED_DISCOVERS
            for _ in range(excess):
                discovers.popleft()
            self.counters["dropped_overload"] += excess

    def work(self) -> None:
        """One chunk: REQUESTs first (oldest first, group commit, then their ACKs), then
        DISCOVERs (newest first: under overload they have the most time left; the
        oldest age out). Small chunks keep the bursts of replies small."""
        counters = self.counters
        now = time.time()
        immediate: list[Outgoing] = []
        durable: list[Outgoing] = []
        requests = self.requests
        for _ in range(min(CHUNK, len(requests))):
            rx = requests.popleft()
            if rx.rx_time and now - rx.rx_time > REQUEST_MAX_AGE:
                counters["dropped_stale"] += 1
                continue
            out = self.handle(rx, now)
            if out is not None:
                (durable if out.durable else immediate).append(out)
        if self.commit(now):
            immediate.extend(durable)  # the leases they confirm are stored now
        if immediate:
            self.send_all(immediate)
            immediate = []
        discovers = self.discovers
        oldest = now - DISCOVER_MAX_AGE
        while discovers and discovers[0].rx_time and discovers[0].rx_time < oldest:
            discovers.popleft()
            counters["dropped_stale"] += 1
        for _ in range(min(CHUNK, len(discovers))):
            out = self.handle(discovers.pop(), now)
            if out is not None:
                immediate.append(out)
        if immediate:
            self.send_all(immediate)
        if self.table.dirty:  # e.g. a DISCOVER path that changed persisted state
            self.commit(now)

    def handle(self, rx: Incoming, now: float) -> Outgoing | None:
        counters = self.counters
        try:
            pkt = decode(rx.data)
        except OversizedPacket as exc:
            counters["dropped_oversized"] += 1
            self.malformed_log.log(
                logging.WARNING, "dropped oversized DHCP packet from %s:%d (%s); "
                "%d oversized so far", int_to_ip(rx.src_ip), rx.src_port, exc.detail,
                counters["dropped_oversized"])
            return None
        except MalformedPacket as exc:
            counters["dropped_malformed"] += 1
            counters.inc(f"malformed_{exc.reason}")
            self.malformed_log.log(
                logging.WARNING, "dropped malformed DHCP packet from %s:%d (%s); "
                "%d malformed so far", int_to_ip(rx.src_ip), rx.src_port, exc,
                counters["dropped_malformed"])
            return None
        mt = pkt.msg_type
        counters.inc(MESSAGE_NAMES.get(mt, "other_type") if mt != REQUEST else "request")
        try:
            return self.handler.handle(pkt, rx, now)
        except DropPacket as exc:
            counters["dropped_other"] += 1
            if exc.reason in ("pool_exhausted", "no_boot"):
                self.error_log.log(logging.WARNING, "not answering %s: %s",
                                   pkt.mac.hex(":"), exc.detail)
            return None
        except Exception:
            counters["internal_errors"] += 1
            log.exception("error handling a DHCP %s from %s", MESSAGE_NAMES.get(mt, mt),
                          pkt.mac.hex(":"))
            return None


def run(config: Config, db: Database, stop: threading.Event | None = None) -> None:
    """Serve DHCP until SIGTERM/SIGINT or until ``stop`` is set."""
    stop = stop or threading.Event()
    restore: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            restore[sig] = signal.signal(sig, lambda *_: stop.set())
    server = DhcpServer(config, db)
    try:
        server.start()
        server.serve(stop)
    finally:
        server.close()
        for sig, handler in restore.items():
            signal.signal(sig, handler)
