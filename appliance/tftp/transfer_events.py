"""TFTP transfers of machines being provisioned, as ``tftp`` events for their timeline.

The engine (in each worker) only collects ended transfers; the supervisor hands them
here, and the counter publisher's thread writes them every few seconds, so neither the
transfers nor the packet loop ever wait for the database. A transfer from an address
that is no machine being provisioned (see :mod:`appliance.watchlist`) is not written.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections import deque
from typing import Any

from appliance.db import Database
from appliance.lifecycle import record_event
from appliance.models import Machine
from appliance.timeline import TFTP
from appliance.watchlist import AddressWatch

log = logging.getLogger("appliance.tftp")

#: The key of a worker's export line holding its ended transfers.
TRANSFERS_KEY = "transfers"
#: Transfers waiting to be written at most (the oldest go first when the DB is away).
PENDING_KEPT = 5000


def describe(transfer: dict[str, Any]) -> str:
    size = int(transfer.get("bytes") or 0)
    took = float(transfer.get("seconds") or 0.0)
    if transfer.get("ok"):
        return f"sent {transfer.get('file')} ({size / 1024:.0f} KiB) in {took:.1f} s"
    return (f"transfer of {transfer.get('file')} failed after {took:.1f} s: "
            f"{transfer.get('why') or 'no reason given'}")


class TransferEvents:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.watch = AddressWatch(db.session)
        self.lock = threading.Lock()
        self.pending: deque[dict[str, Any]] = deque(maxlen=PENDING_KEPT)

    def add(self, transfers: list[dict[str, Any]]) -> None:
        if transfers:
            with self.lock:
                self.pending.extend(t for t in transfers if isinstance(t, dict))

    def write(self) -> int:
        """Write the pending transfers of watched machines; returns how many."""
        with self.lock:
            batch = list(self.pending)
            self.pending.clear()
        mine = [(t, w) for t in batch if (w := self.watch.lookup(str(t.get("client")))) is not None]
        if not mine:
            return 0
        try:
            with self.db.session() as session:
                for transfer, watched in mine:
                    machine = session.get(Machine, watched.machine_id)
                    if machine is None:
                        continue
                    at = dt.datetime.fromtimestamp(float(transfer.get("end") or 0), dt.UTC)
                    record_event(session, machine, "tftp", TFTP, describe(transfer),
                                 {k: transfer.get(k) for k in
                                  ("client", "file", "bytes", "seconds", "ok", "why")},
                                 at=at.replace(tzinfo=None))
        except Exception as exc:  # noqa: BLE001 - a timeline gap, never a stalled part
            log.warning("could not record %d TFTP transfer(s) for the timeline: %s",
                        len(mine), exc)
            return 0
        return len(mine)
