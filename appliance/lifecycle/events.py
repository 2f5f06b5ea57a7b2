"""Machine registration as machines are seen, and event rows."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from appliance.mac import normalize_mac
from appliance.models import Event, Machine, utcnow

DISCOVERED = "discovered"


def record_event(
    session: Session,
    machine: Machine | None,
    actor: str,
    kind: str,
    message: str = "",
    details: dict[str, Any] | None = None,
    at: dt.datetime | None = None,
) -> Event:
    """Add an event to the session; ``at`` (UTC) when it happened earlier than now."""
    event = Event(
        machine=machine, actor=actor, kind=kind, message=message, details=details,
        at=at or utcnow(),
    )
    session.add(event)
    return event


def record_seen(
    session: Session,
    mac: str,
    seen_on: str | None,
    actor: str,
    arch: str | None = None,
) -> Machine:
    """Find the machine with ``mac``, or register it as ``discovered``; update last seen.

    Registration and its event are part of the caller's transaction.
    """
    mac = normalize_mac(mac)
    machine = session.scalar(select(Machine).where(Machine.mac == mac))
    now = utcnow()
    if machine is None:
        machine = Machine(
            mac=mac, state=DISCOVERED, bootenv="discovery", first_seen_at=now,
            last_seen_at=now, seen_on=seen_on, arch=arch,
        )
        try:
            # Another process (DHCP vs HTTP) may register the same MAC at the same time.
            with session.begin_nested():
                session.add(machine)
                session.flush()
        except IntegrityError:
            existing = session.scalar(select(Machine).where(Machine.mac == mac))
            if existing is None:
                raise
            existing.last_seen_at = now
            return existing
        record_event(
            session, machine, actor, "discovered",
            f"unknown machine {mac} seen on {seen_on or 'unknown interface'}",
            {"seen_on": seen_on, "arch": arch},
        )
    else:
        machine.last_seen_at = now
        if seen_on:
            machine.seen_on = seen_on
        if arch:
            machine.arch = arch
    return machine
