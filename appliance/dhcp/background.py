"""Database work beside the packets: registering seen machines, publishing counters,
noticing subnet/reservation changes made by the CLI or API."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import deque
from collections.abc import Callable

from sqlalchemy import select

from appliance.db import Database, publish_counters
from appliance.dhcp.leases import SubnetInfo
from appliance.dhcp.stats import Counters
from appliance.dhcp.store import load_subnets, subnet_signature
from appliance.lifecycle import record_event, record_seen
from appliance.models import Machine
from appliance.watchlist import REFRESH_SECONDS, provisioning_macs

log = logging.getLogger("appliance.dhcp")

SEEN_INTERVAL = 60.0  # register / touch a MAC at most once a minute
SEEN_BATCH = 10  # machines per transaction (keeps SQLite's write lock short)
SEEN_QUEUE = 10000
#: Timeline exchanges kept while the database is slow (older ones are dropped, counted).
EXCHANGE_QUEUE = 2000
#: The same reply to the same machine (same type, address and boot file) is an event at
#: most once in this many seconds: a machine stuck in a PXE retry loop for the whole boot
#: phase writes a few dozen events, not thousands. The timeline needs only the first.
EXCHANGE_REPEAT_SECONDS = 30.0


class SeenRecorder:
    """Calls ``lifecycle.record_seen`` for each client, at most once per MAC a minute.

    ``note`` is called on the packet path: a dict lookup, and a queue put once a minute
    per MAC. The database work happens in ``flush``, a few machines at a time.
    """

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self.last: dict[str, float] = {}
        #: (mac, seen on, arch) waiting for ``flush``; only the packet thread uses it
        self.queue: deque[tuple[str, str, str | None]] = deque()
        #: MACs of the machines being provisioned (``watchlist``), replaced every few
        #: seconds by the housekeeper; their exchanges become timeline events.
        self.watched: frozenset[str] = frozenset()
        #: (mac, wall time, reply type, address, boot file or URL) waiting for ``flush``
        self.exchanges: deque[tuple[str, float, str, str, str]] = deque()
        #: (mac, reply, address, boot) -> when it was last queued (monotonic)
        self.exchanged: dict[tuple[str, str, str, str], float] = {}

    def exchange(self, mac: str, reply: str, address: str, boot: str) -> None:
        """A reply to a watched machine (call only when ``mac in self.watched``)."""
        now = time.monotonic()
        key = (mac, reply, address, boot)
        if now - self.exchanged.get(key, -EXCHANGE_REPEAT_SECONDS) < EXCHANGE_REPEAT_SECONDS:
            return
        if len(self.exchanges) >= EXCHANGE_QUEUE:
            self.counters["timeline_dropped"] += 1
            return
        if len(self.exchanged) > 10000:
            self.exchanged.clear()
        self.exchanged[key] = now
        self.exchanges.append((mac, time.time(), reply, address, boot))

    def due(self, mac: str) -> bool:
        """Is it time to record ``mac`` again? (cheap; call before building ``note``'s
        arguments). False, and counted as dropped, while the queue is full."""
        if time.monotonic() - self.last.get(mac, -SEEN_INTERVAL) < SEEN_INTERVAL:
            return False
        if len(self.queue) >= SEEN_QUEUE:
            self.counters["seen_dropped"] += 1
            return False
        return True

    def note(self, mac: str, seen_on: str, arch: str | None) -> None:
        now = time.monotonic()
        last = self.last
        if now - last.get(mac, -SEEN_INTERVAL) < SEEN_INTERVAL:
            return
        if len(self.queue) >= SEEN_QUEUE:
            self.counters["seen_dropped"] += 1
            return
        self.queue.append((mac, seen_on, arch))
        if len(last) > 200000:
            last.clear()
        last[mac] = now
        self.counters["seen_queued"] += 1

    def flush(self, db: Database, budget: float = 0.05, batch_size: int = SEEN_BATCH) -> None:
        """Record queued machines in small transactions until ``budget`` seconds pass."""
        deadline = time.monotonic() + budget
        self.flush_exchanges(db)
        pending = self.queue
        while pending and time.monotonic() < deadline:
            batch: dict[str, tuple[str, str | None]] = {}
            while len(batch) < batch_size and pending:
                mac, seen_on, arch = pending.popleft()
                batch[mac] = (seen_on, arch)
            try:
                with db.session() as s:
                    for mac, (seen_on, arch) in batch.items():
                        record_seen(s, mac, seen_on[:64], "dhcp", arch)
            except Exception:
                log.exception("could not record %d seen machine(s)", len(batch))

    def flush_exchanges(self, db: Database) -> None:
        """Write the queued exchanges as ``dhcp`` events (one transaction)."""
        if not self.exchanges:
            return
        batch = list(self.exchanges)
        self.exchanges.clear()
        try:
            with db.session() as s:
                machines = {m.mac: m for m in s.scalars(
                    select(Machine).where(Machine.mac.in_({b[0] for b in batch})))}
                for mac, at, reply, address, boot in batch:
                    machine = machines.get(mac)
                    if machine is None:
                        continue
                    via = f" (boot {boot})" if boot else ""
                    record_event(s, machine, "dhcp", "dhcp", f"{reply.upper()} {address}{via}",
                                 {"type": reply, "address": address, "boot": boot},
                                 at=dt.datetime.fromtimestamp(at, dt.UTC).replace(tzinfo=None))
        except Exception:
            self.counters["timeline_dropped"] += len(batch)
            log.exception("could not record %d DHCP exchange(s) for the timeline", len(batch))


class Housekeeper:
    """Periodic database work, done by the packet loop between batches in small slices
    (one thread does all of the part's database work: it never waits for itself on
    SQLite's write lock, and no thread starves another of the GIL): register seen
    machines, publish counters, reload subnets when they changed."""

    def __init__(self, db: Database, counters: Counters, recorder: SeenRecorder,
                 on_subnets: Callable[[list[SubnetInfo]], None] | None,
                 interval: float = 5.0, signature: object = None) -> None:
        self.db = db
        self.counters = counters
        self.recorder = recorder
        self.on_subnets = on_subnets
        self.interval = interval
        self.signature = signature
        self.next_tick = time.monotonic() + interval
        self.next_watch = 0.0

    def refresh_watched(self) -> None:
        try:
            with self.db.session() as s:
                self.recorder.watched = provisioning_macs(s)
        except Exception as exc:  # keep the last list; the next tick tries again
            log.warning("could not read the machines being provisioned: %s", exc)

    def publish(self) -> None:
        try:
            publish_counters(self.db, "dhcp", self.counters.snapshot())
        except Exception:
            log.exception("could not publish DHCP counters")

    def check_subnets(self) -> None:
        if self.on_subnets is None:
            return
        try:
            sig = subnet_signature(self.db)
            if sig != self.signature:
                subnets = load_subnets(self.db)
                self.signature = sig
                self.on_subnets(subnets)
        except Exception:
            log.exception("could not reload subnets")

    def idle(self, budget: float) -> float:
        """A slice of work of about ``budget`` seconds (plus the periodic tasks due);
        returns the time spent."""
        start = time.monotonic()
        if budget > 0:
            self.recorder.flush(self.db, budget,
                                batch_size=SEEN_BATCH if budget >= 0.02 else 4)
        if time.monotonic() >= self.next_watch:
            self.refresh_watched()
            self.next_watch = time.monotonic() + REFRESH_SECONDS
        if time.monotonic() >= self.next_tick:
            self.publish()
            self.check_subnets()
            self.next_tick = time.monotonic() + self.interval
        return time.monotonic() - start

    def final(self) -> None:
        self.recorder.flush(self.db, budget=2.0)
        self.publish()
