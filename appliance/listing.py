"""Machines as operators list them: filtered, searched, paginated in SQL, with each
machine's address and last event. The API, the web UI and the CLI all list through
:func:`machine_page`, so a page costs the same few queries whether there are ten
machines or ten thousand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from appliance.lifecycle.states import STATES
from appliance.models import Event, Lease, Machine, Reservation, utcnow

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
MAX_QUERY = 64


class ListingError(ValueError):
    """A filter or page value refused (the message names the field)."""


#: Far beyond any fleet; keeps the value inside SQL's 64-bit integers.
MAX_OFFSET = 2 ** 31


@dataclass(frozen=True)
class MachineFilter:
    #: One of the lifecycle states, or empty for all.
    state: str = ""
    #: Case-insensitive substring of the MAC, hostname or bootenv.
    q: str = ""
    limit: int = DEFAULT_LIMIT
    offset: int = 0

    def check(self) -> MachineFilter:
        if self.state and self.state not in STATES:
            raise ListingError(f"state: one of {', '.join(STATES)}, not {self.state[:40]!r}")
        if len(self.q) > MAX_QUERY:
            raise ListingError(f"q: at most {MAX_QUERY} characters")
        if not 1 <= self.limit <= MAX_LIMIT:
            raise ListingError(f"limit: 1 to {MAX_LIMIT}")
        if not 0 <= self.offset <= MAX_OFFSET:
            raise ListingError(f"offset: 0 to {MAX_OFFSET}")
        return self


def iso(value: Any) -> str | None:
    """A datetime as ISO 8601 text; None stays None."""
    return value.isoformat() if value is not None else None


def machine_page(session: Session, flt: MachineFilter) -> dict[str, Any]:
    """``{"items": [...], "total": N, "limit", "offset", "states": {state: count}}``,
    ordered by hostname then MAC (machines without a hostname last)."""
    flt.check()
    query = select(Machine)
    count = select(func.count(Machine.id))
    if flt.state:
        query = query.where(Machine.state == flt.state)
        count = count.where(Machine.state == flt.state)
    if flt.q:
        text = flt.q.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        like = f"%{text}%"
        cond = or_(*(func.lower(column).like(like, escape="\\")
                     for column in (Machine.mac, Machine.hostname, Machine.bootenv)))
        query, count = query.where(cond), count.where(cond)
    total = session.scalar(count) or 0
    machines = list(session.scalars(
        query.order_by(Machine.hostname.is_(None), Machine.hostname, Machine.mac)
        .limit(flt.limit).offset(flt.offset)))
    by_state = dict.fromkeys(STATES, 0)
    for state, n in session.execute(select(Machine.state, func.count(Machine.id))
                                    .group_by(Machine.state)):
        by_state[state] = n
    return {"items": summaries(session, machines), "total": total, "limit": flt.limit,
            "offset": flt.offset, "states": by_state}


def summaries(session: Session, machines: list[Machine]) -> list[dict[str, Any]]:
    """One row per machine: what the list shows (three queries for the whole page)."""
    if not machines:
        return []
    ids = [m.id for m in machines]
    macs = [m.mac for m in machines]
    last_ids = select(func.max(Event.id)).where(Event.machine_id.in_(ids)) \
        .group_by(Event.machine_id)
    last = {e.machine_id: e for e in session.scalars(select(Event).where(Event.id.in_(last_ids)))}
    now = utcnow()
    leased = {lease.mac: lease.ip for lease in session.scalars(
        select(Lease).where(Lease.mac.in_(macs), Lease.state == "bound",
                            Lease.expires_at > now))}
    reserved = {r.mac: r.ip for r in session.scalars(
        select(Reservation).where(Reservation.mac.in_(macs)))}
    rows = []
    for m in machines:
        event = last.get(m.id)
        rows.append({
            "mac": m.mac, "hostname": m.hostname, "state": m.state, "phase": m.phase,
            "bootenv": m.bootenv, "address": leased.get(m.mac) or reserved.get(m.mac),
            "power_state": m.power_state, "bmc": m.bmc_driver, "arch": m.arch,
            "seen_on": m.seen_on,
            "state_reason": m.state_reason, "last_seen_at": iso(m.last_seen_at),
            "last_event": {"at": iso(event.at), "kind": event.kind, "actor": event.actor,
                           "message": event.message} if event else None,
        })
    return rows


def all_machines(session: Session, state: str = "", q: str = "") -> list[dict[str, Any]]:
    """Every matching machine's summary, page by page (for the CLI)."""
    rows: list[dict[str, Any]] = []
    while True:
        page = machine_page(session, MachineFilter(state=state, q=q, limit=MAX_LIMIT,
                                                   offset=len(rows)))
        rows += page["items"]
        if not page["items"] or len(rows) >= page["total"]:
            return rows


def bootenv_rows(catalog: Any, images_dir: Any) -> list[dict[str, Any]]:
    """The bootenvs as ``appliance bootenvs`` and ``GET /api/v1/bootenvs`` show them."""
    rows = []
    for env in catalog.bootenvs.values():
        missing = env.missing_files(images_dir)
        rows.append({
            "name": env.name, "os": f"{env.os.family} {env.os.version}".strip(),
            "installs": bool(env.installs),
            "firmware": ",".join(env.firmware) or ("local disk" if env.local_boot else ""),
            "files": ",".join(env.templates), "artifacts": ",".join(a.name for a in env.artifacts),
            "images": "missing: " + ",".join(missing) if missing else "ok",
            "description": " ".join(env.description.split()),
        })
    return rows


def profile_rows(session: Session) -> list[dict[str, Any]]:
    """Profiles with their params (values included: params are not credentials)."""
    from appliance.profiles import list_profiles

    return [{"name": p.name, "description": p.description or "", "params": dict(p.params or {})}
            for p in list_profiles(session)]


def image_rows(config: Any, db: Any) -> list[dict[str, Any]]:
    """The artifacts as ``appliance images list --json`` and ``GET /api/v1/images`` show
    them: declared by the bootenvs and ``images/manifest.yaml``, or imported."""
    from appliance.images.manifest import load_catalog
    from appliance.images.store import list_images

    artifacts, _errors = load_catalog(config.boot.bootenvs_dir)
    return list_images(config, db, artifacts)
