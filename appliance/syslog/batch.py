"""Batched database writes of received syslog lines, and their retention.

The receive loop ``add``s each parsed line; ``flush`` writes everything pending in one
transaction when ``MAX_BATCH`` lines are waiting or the oldest has waited
``MAX_DELAY`` seconds, so a flood costs one commit per batch, not per line.

Lines are attributed by source address (``installlogs.machine_for_address``, cached for
``ADDRESS_TTL`` seconds). Lines from an address with no current lease are *unmatched*:
the first ``max_unmatched_lines`` of each ``RETENTION_EVERY`` window are stored with
``machine_id`` NULL (so an operator can still read an installer whose lease is unknown),
the rest are dropped and counted; retention keeps at most ``max_unmatched_lines`` of them.

Retention (``installlogs.trim_install_logs``) runs every ``RETENTION_EVERY`` seconds for
the machines written to since, and at once for a machine that wrote more than a quarter
of its cap since its last trim, so no installer grows past 1.25 x the cap.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from appliance.config import SyslogConfig
from appliance.db import Database
from appliance.installlogs import (
    LogLine,
    machine_for_address,
    record_install_lines,
    trim_install_logs,
)
from appliance.models import Machine
from appliance.ratelimit import RateLimitedLog

log = logging.getLogger("appliance.syslog")

MAX_BATCH = 500
MAX_DELAY = 0.2
ADDRESS_TTL = 5.0
ADDRESS_CACHE_MAX = 4096
RETENTION_EVERY = 60.0

COUNTER_NAMES = (
    "received", "received_udp", "received_tcp", "stored", "unmatched", "unmatched_stored",
    "unmatched_dropped", "malformed", "malformed_no_pri", "malformed_empty",
    "malformed_oversized", "db_commits", "db_errors", "db_lost_lines", "trimmed",
    "tcp_connections", "tcp_refused", "internal_errors",
)


def new_counters() -> dict[str, int]:
    return dict.fromkeys(COUNTER_NAMES, 0)


@dataclass
class _Cached:
    machine_id: int | None
    until: float


class Batcher:
    def __init__(self, db: Database, cfg: SyslogConfig, counters: dict[str, int],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.db = db
        self.cfg = cfg
        self.counters = counters
        self.clock = clock
        self.pending: list[tuple[str, LogLine]] = []
        self.first_at = 0.0
        self.addresses: dict[str, _Cached] = {}
        #: Lines written per machine (None: unmatched) since its last trim.
        self.since_trim: dict[int | None, int] = {}
        self.unmatched_window = 0
        self.next_retention = clock() + RETENTION_EVERY
        self.warn = RateLimitedLog(log)

    # -- receiving -------------------------------------------------------------------
    def add(self, client: str, line: LogLine) -> None:
        if not self.pending:
            self.first_at = self.clock()
        self.pending.append((client, line))

    def due(self) -> bool:
        return bool(self.pending) and (len(self.pending) >= MAX_BATCH
                                       or self.clock() - self.first_at >= MAX_DELAY)

    def wait_time(self) -> float | None:
        """Seconds until the pending batch is due (None: nothing pending)."""
        if not self.pending:
            return None
        return max(0.0, self.first_at + MAX_DELAY - self.clock())

    # -- writing ---------------------------------------------------------------------
    def _machine(self, session, client: str) -> Machine | None:  # type: ignore[no-untyped-def]
        now = self.clock()
        cached = self.addresses.get(client)
        if cached is not None and cached.until > now:
            if cached.machine_id is None:
                return None
            machine = session.get(Machine, cached.machine_id)
            if machine is not None:
                return machine
        machine = machine_for_address(session, client)
        if len(self.addresses) >= ADDRESS_CACHE_MAX:
            self.addresses.clear()
        self.addresses[client] = _Cached(machine.id if machine else None, now + ADDRESS_TTL)
        return machine

    def flush(self) -> int:
        """Write every pending line in one transaction; return the number stored."""
        if not self.pending:
            return 0
        batch, self.pending = self.pending, []
        by_client: dict[str, list[LogLine]] = {}
        for client, line in batch:
            by_client.setdefault(client, []).append(line)
        stored = unmatched = unmatched_stored = 0
        written: dict[int | None, int] = {}
        try:
            with self.db.session() as session:
                for client, lines in by_client.items():
                    machine = self._machine(session, client)
                    if machine is None:
                        unmatched += len(lines)
                        room = max(0, self.cfg.max_unmatched_lines - self.unmatched_window
                                   - unmatched_stored)
                        lines = lines[:room]
                        unmatched_stored += len(lines)
                    n = record_install_lines(session, machine, "syslog", client, lines)
                    stored += n
                    key = machine.id if machine is not None else None
                    written[key] = written.get(key, 0) + n
        except Exception as exc:
            self.counters["db_errors"] += 1
            self.counters["db_lost_lines"] += len(batch)
            self.addresses.clear()
            self.warn.log(logging.WARNING, "could not store %d syslog line(s): %s",
                          len(batch), exc)
            return 0
        self.counters["db_commits"] += 1
        self.counters["stored"] += stored
        self.counters["unmatched"] += unmatched
        self.counters["unmatched_stored"] += unmatched_stored
        self.counters["unmatched_dropped"] += unmatched - unmatched_stored
        self.unmatched_window += unmatched_stored
        for key, n in written.items():
            if n:
                self.since_trim[key] = self.since_trim.get(key, 0) + n
        chatty = [k for k, n in self.since_trim.items()
                  if k is not None and n > max(1, self.cfg.max_lines_per_machine // 4)]
        if chatty:
            self.trim(chatty)
        return stored

    # -- retention -------------------------------------------------------------------
    def trim(self, machine_ids: list[int | None]) -> int:
        try:
            with self.db.session() as session:
                deleted = trim_install_logs(
                    session, self.cfg.max_lines_per_machine, machine_ids,
                    max_unmatched=self.cfg.max_unmatched_lines)
        except Exception as exc:
            self.counters["db_errors"] += 1
            self.warn.log(logging.WARNING, "could not trim install logs: %s", exc)
            return 0
        for key in machine_ids:
            self.since_trim.pop(key, None)
        self.counters["trimmed"] += deleted
        return deleted

    def retention_due(self) -> bool:
        return self.clock() >= self.next_retention

    def retention(self) -> int:
        """The periodic pass: trim what was written since the last one; a new window
        for unmatched lines."""
        self.next_retention = self.clock() + RETENTION_EVERY
        self.unmatched_window = 0
        if not self.since_trim:
            return 0
        return self.trim(list(self.since_trim))
