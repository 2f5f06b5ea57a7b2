"""The DHCP part: ``run(config, db, stop)`` serves until SIGTERM/SIGINT or ``stop``.

One thread does everything, like a single-threaded C server: read a small chunk of
packets, answer it, read the next. What it cannot answer soon it leaves to the kernel,
which drops it at the socket for free (small receive buffers, see ``transport``):
reading and decoding packets only to drop them would take the CPU the answers need.

- REQUESTs (and everything but DISCOVERs) come first: finishing an exchange beats
  starting a new one. With the DISCOVER socket split off they never queue behind a
  flood of DISCOVERs.
- A chunk's lease changes are written in one transaction (group commit) before its
  ACKs are sent, so a sent ACK is durable. OFFERs and NAKs go out before the commit.
- Replies go out per chunk (at most ``CHUNK``), between reads: the peer's receive
  buffer never sees a burst of thousands.
- Between chunks the other database work is done in small slices.

Why one thread: a second thread that commits or sends would have to win the GIL back
from the busy packet loop at every system call (up to the 5 ms switch interval each
time), which under load delays ACKs by far more than the commit itself costs.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from typing import Any

from appliance.config import Config
from appliance.db import Database
from appliance.dhcp.background import Housekeeper, SeenRecorder
from appliance.dhcp.codec import DropPacket, MalformedPacket, OversizedPacket, decode, int_to_ip
from appliance.dhcp.codec import peek_message_type as peek
from appliance.dhcp.handler import HandlerConfig, ServerHandler
from appliance.dhcp.leases import LeaseTable, SubnetInfo
from appliance.dhcp.options import DISCOVER, MESSAGE_NAMES, PXE_PORT
from appliance.dhcp.packets import Incoming, Outgoing
from appliance.dhcp.proxy import ProxyHandler
from appliance.dhcp.stats import Counters
from appliance.dhcp.steering import SteeringConfig
from appliance.dhcp.store import (
    LeaseWriter,
    lease_row,
    load_leases,
    load_subnets,
    subnet_signature,
    tune_connections,
)
from appliance.dhcp.transport import Transport
from appliance.ratelimit import RateLimitedLog
from appliance.stopsignals import stop_on_signals

log = logging.getLogger("appliance.dhcp")

#: Packets read and answered together: one group commit per chunk of REQUESTs, and the
#: largest burst of replies (a client's or relay's receive buffer holds only so many).
CHUNK = 32
#: Chunks of REQUESTs (and other non-DISCOVERs) answered before the next DISCOVERs, so
#: a flood of other packets cannot starve new exchanges entirely.
MAX_REQUEST_CHUNKS = 8
#: A DISCOVER older than this is not answered: its exchange would finish too late.
DISCOVER_MAX_AGE = 0.5
#: A REQUEST older than this is not answered.
REQUEST_MAX_AGE = 3.0
#: Share of the time database housekeeping (registering the machines seen, mostly) may
#: take while packets keep coming; the rest goes to answering.
HOUSEKEEPING_SHARE = 0.05
#: Housekeeping slice when no packet came while the loop waited in poll().
QUIET_SLICE = 0.05
#: Smallest housekeeping slice worth starting while packets flow.
MIN_SLICE = 0.003
#: Message type -> counter of received messages.
_COUNTED = dict(MESSAGE_NAMES)


def housekeeping_budget(waited: bool, events: bool, allowance: float) -> float:
    """Seconds of housekeeping to do after a poll(): a good slice when the loop waited
    (poll with a timeout) and nothing came; otherwise what the allowance grants, if it is
    worth a slice. An empty poll(0) right after a full chunk is not quiet: it is a lull
    in a stream of packets, and a quiet-sized slice there would delay the next ones."""
    if waited and not events:
        return QUIET_SLICE
    return allowance if allowance >= MIN_SLICE else 0.0


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
        self.kernel_drops_at_start = 0
        tune_connections(db)
        self.lease_writer = LeaseWriter(db)
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
        self.kernel_drops_at_start = self.transport.kernel_drops() or 0


    def close(self) -> None:
        if self.housekeeper is not None:
            self.housekeeper.final()
        self.lease_writer.close()
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
            self.lease_writer.write([lease_row(e, now) for e in dirty])
        except Exception:
            self.counters["db_errors"] += 1
            self.error_log.log(logging.ERROR, "could not store %d lease change(s); their "
                               "ACKs are not sent", len(dirty), exc_info=True)
            return False
        self.counters["db_commits"] += 1
        return True

    # -- sending ---------------------------------------------------------------------
    def send_one(self, out: Outgoing) -> None:
        assert self.transport is not None
        try:
            self.transport.send(out)
            self.counters["sent"] += 1
        except OSError as exc:
            self.counters.inc("send_errors")
            self.error_log.log(logging.WARNING, "could not send reply to %s:%d: %s",
                               int_to_ip(out.dst_ip), out.dst_port, exc)

    # -- the loop ----------------------------------------------------------------------
    def serve(self, stop: threading.Event) -> None:
        assert self.transport is not None and self.housekeeper is not None
        poller = select.poll()
        receivers = self.transport.receivers()
        for sock, _port, _disc in receivers:
            poller.register(sock.fileno(), select.POLLIN)
        allowance, cpu_last = 0.0, time.thread_time()
        next_drops = 0.0
        busy = False
        while not stop.is_set():
            if self.pending_subnets is not None:
                subnets, self.pending_subnets = self.pending_subnets, None
                self.table.set_subnets(subnets)
                log.info("subnets reloaded: %s", ", ".join(s.cidr for s in subnets) or "none")
            waited = not busy
            events = poller.poll(0 if busy else 200)
            busy = bool(events) and self.pump(receivers)
            # Other database work: when quiet, a good slice; while packets flow, at most
            # HOUSEKEEPING_SHARE of the time, so registering a flood of new machines
            # never slows the answers down. The share is of this thread's CPU time, not
            # of the clock: on a machine busy with other work, where this thread gets
            # half a core, housekeeping gets half as much, as the answers do.
            cpu = time.thread_time()
            allowance = min(allowance + HOUSEKEEPING_SHARE * (cpu - cpu_last), QUIET_SLICE)
            cpu_last = cpu
            now = time.monotonic()
            allowance -= self.housekeeper.idle(
                housekeeping_budget(waited, bool(events), allowance))
            if now >= next_drops:  # what the kernel shed for us, for the counters
                next_drops = now + 1.0
                drops = self.transport.kernel_drops()
                if drops is not None:
                    self.counters["dropped_overload"] = max(
                        0, drops - self.kernel_drops_at_start)

    def pump(self, receivers: list[tuple[Any, int, bool]]) -> bool:
        """Answer what is waiting: the non-DISCOVER sockets chunk by chunk until empty
        (at most MAX_REQUEST_CHUNKS), then one chunk of DISCOVERs. True when a socket
        may have more."""
        assert self.transport is not None
        read = self.transport.read
        more = False
        for sock, port, discovers_only in receivers:
            rounds = 1 if discovers_only else MAX_REQUEST_CHUNKS
            for _ in range(rounds):
                batch: list[Incoming] = []
                n = read(sock, port, batch, CHUNK)
                if n:
                    self.answer(batch)
                if n < CHUNK:
                    break
            else:
                more = True
        return more

    def answer(self, batch: list[Incoming]) -> None:
        """Answer one chunk of received packets: everything but DISCOVERs first (their
        lease changes committed in one transaction before their ACKs go out), then the
        DISCOVERs. Stale packets are dropped unanswered."""
        counters = self.counters
        counters["received"] += len(batch)
        now = time.time()
        discover_deadline = now - DISCOVER_MAX_AGE
        request_deadline = now - REQUEST_MAX_AGE
        durable: list[Outgoing] = []
        discovers: list[Incoming] = []
        handle = self.handle
        send = self.send_one

        def answer_one(rx: Incoming, deadline: float) -> None:
            if rx.rx_time and rx.rx_time < deadline:
                counters["dropped_stale"] += 1
                return
            out = handle(rx, now)
            if out is None:
                return
            if out.durable:
                durable.append(out)
            else:
                send(out)  # OFFERs, NAKs, INFORM ACKs: nothing to store, sent as made

        for rx in batch:
            if peek(rx.data) == DISCOVER:
                discovers.append(rx)
            else:
                answer_one(rx, request_deadline)
        for rx in discovers:
            answer_one(rx, discover_deadline)
        if self.table.dirty and not self.commit(now):
            return  # not stored: the ACKs are not sent
        for out in durable:
            send(out)  # the leases they confirm are stored now

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
        name = _COUNTED.get(mt, "other_type")
        counters[name] = counters.get(name, 0) + 1
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
    server = DhcpServer(config, db)
    with stop_on_signals(stop, "DHCP", log):
        try:
            server.start()
            server.serve(stop)
        finally:
            server.close()
