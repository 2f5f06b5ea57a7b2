"""Requests that match no machine (an unknown token, an address that is no machine's):
404, never another machine's data, and an event, at most one per client and kind per
minute, so a scanner on the provisioning network cannot flood the event table.

The limit is per process (each gunicorn worker keeps its own), which bounds the events
to a few per client per minute.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from flask import Response, request
from sqlalchemy.orm import Session

from appliance.lifecycle import record_event
from appliance.models import Machine

#: Seconds between two events of one kind for one client (the rest are only answered).
EVENT_INTERVAL = 60.0
#: Entries kept before the table is cleared (a scan of many source addresses).
MAX_CLIENTS = 10_000

_seen: dict[tuple[str, str], float] = {}
_lock = threading.Lock()


def reset() -> None:
    """Forget every client (tests)."""
    with _lock:
        _seen.clear()


def _due(kind: str, client: str) -> bool:
    now = time.monotonic()
    with _lock:
        last = _seen.get((kind, client))
        if last is not None and now - last < EVENT_INTERVAL:
            return False
        if len(_seen) >= MAX_CLIENTS:
            _seen.clear()
        _seen[(kind, client)] = now
    return True


def record_limited(session: Session, machine: Machine | None, kind: str, message: str,
                   details: dict[str, Any] | None = None) -> bool:
    """Record an event of ``kind`` for the requesting client unless one was recorded for
    it within :data:`EVENT_INTERVAL`; True when recorded."""
    client = request.remote_addr or ""
    if not _due(kind, client):
        return False
    record_event(session, machine, "http", kind, message,
                 {"client": client, "path": request.path[:200], **(details or {})})
    return True


def unknown_request(session: Session, kind: str, what: str, answer: str,
                    machine: Machine | None = None) -> Response:
    """404 with ``answer``, and (rate-limited) an event ``kind``: "<what> from <client>"."""
    record_limited(session, machine, kind, f"{what} from {request.remote_addr or '?'}")
    return Response(answer, status=404, mimetype="text/plain")
