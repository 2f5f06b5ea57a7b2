"""Failed UI logins are events (``login-failed``), and they slow guessing down: after
``PER_CLIENT`` failures for one user name from one address within ``WINDOW`` seconds, or
``PER_NAME`` from anywhere, logins for that name are refused (HTTP 429) without looking
at the password until the window has passed. The count lives in the database, so every
HTTP worker process sees the same one."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select
from sqlalchemy.orm import Session

from appliance.lifecycle import record_event
from appliance.models import Event, utcnow

KIND = "login-failed"
WINDOW = 300
PER_CLIENT = 5
PER_NAME = 20


def record_failure(session: Session, name: str, client: str) -> None:
    record_event(session, None, f"ui:{client}"[:64], KIND,
                 f"failed login as {name[:64]!r} from {client}",
                 {"name": name[:64], "client": client})


def retry_after(session: Session, name: str, client: str,
                now: dt.datetime | None = None) -> int:
    """Seconds until a login for ``name`` from ``client`` is tried again; 0: go ahead."""
    now = now or utcnow()
    since = now - dt.timedelta(seconds=WINDOW)
    failures = [(e.at, e.details or {}) for e in session.scalars(
        select(Event).where(Event.kind == KIND, Event.at >= since)
        .order_by(Event.id.desc()).limit(1000))]
    mine = [at for at, d in failures if d.get("name") == name[:64]]
    here = [at for at, d in failures if d.get("name") == name[:64] and d.get("client") == client]
    for times, limit in ((here, PER_CLIENT), (mine, PER_NAME)):
        if len(times) >= limit:
            oldest_counted = sorted(times)[-limit]
            return max(1, int((oldest_counted + dt.timedelta(seconds=WINDOW) - now)
                              .total_seconds()) + 1)
    return 0
