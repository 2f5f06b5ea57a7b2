"""Installer log lines: the one place they are stored, trimmed and read.

Lines arrive from the syslog part (``appliance.syslog``, remote syslog from
debian-installer, anaconda, subiquity) and from the HTTP log upload endpoint. A line is
attributed to the machine that holds a current DHCP lease for the address it came from;
a line from an address with no current lease is stored with ``machine_id`` NULL (the
caller decides how many of those it keeps).

Sizes are bounded here (message, program, client), so no sender can store an unbounded
row, and ``trim_install_logs`` keeps at most a fixed number of lines per machine: the
callers run it periodically, not per line.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from appliance.lifecycle import record_event
from appliance.models import InstallLog, Lease, Machine, utcnow

#: Longest message stored, in characters; longer ones are cut and marked.
MAX_MESSAGE = 4096
MAX_PROGRAM = 64
MAX_CLIENT = 45
TRUNCATED_MARK = " [truncated]"
SOURCES = ("syslog", "upload")
#: Lease states that tie an address to a machine right now.
#: An offered (not yet bound) address could be claimed by a spoofing sender.
CURRENT_LEASE_STATES = ("bound",)
#: A machine whose previous line is older than this starts a new install log: one
#: ``installer-log-started`` event, not one per line.
LOG_STARTED_GAP = dt.timedelta(minutes=10)
#: Default cap of lines kept per machine (``[syslog] max_lines_per_machine``).
DEFAULT_MAX_LINES_PER_MACHINE = 20_000
DEFAULT_READ_LIMIT = 1000


@dataclass(frozen=True)
class LogLine:
    """One installer log line, before it is stored.

    ``severity`` is the syslog severity 0-7 (7 debug) or None; ``at`` is when the
    appliance received it (None: now).
    """

    severity: int | None
    program: str
    message: str
    at: dt.datetime | None = None


def _clean(text: str, limit: int, mark: str = "") -> str:
    # PostgreSQL text cannot hold NUL; a sender can put anything in a datagram.
    text = text.replace("\x00", "\ufffd")
    if len(text) > limit:
        text = text[: limit - len(mark)] + mark
    return text


def normalize_address(ip: str) -> str:
    """``::ffff:10.0.0.5`` (a dual-stack socket's view of IPv4) becomes ``10.0.0.5``."""
    try:
        addr = ipaddress.ip_address(ip.strip())
    except ValueError:
        return ip.strip()
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def machine_for_address(session: Session, ip: str) -> Machine | None:
    """The machine holding a current (bound, unexpired) lease on ``ip``."""
    ip = normalize_address(ip)
    lease = session.scalar(
        select(Lease).where(
            Lease.ip == ip,
            Lease.state.in_(CURRENT_LEASE_STATES),
            Lease.expires_at > utcnow(),
        )
    )
    if lease is None:
        return None
    return session.scalar(select(Machine).where(Machine.mac == lease.mac))


def record_install_lines(
    session: Session,
    machine: Machine | None,
    source: str,
    client: str,
    lines: Iterable[LogLine],
    actor: str | None = None,
) -> int:
    """Add ``lines`` from ``client`` to ``machine``'s install log (None: unmatched).

    Part of the caller's transaction. When the machine had no line in the last
    ``LOG_STARTED_GAP``, one ``installer-log-started`` event is recorded with the first
    line. Returns the number of lines added.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}, not {source!r}")
    client = _clean(normalize_address(client), MAX_CLIENT)
    now = utcnow()
    rows = [
        InstallLog(
            machine_id=machine.id if machine is not None else None,
            at=line.at or now,
            source=source,
            client=client,
            severity=line.severity if line.severity in range(8) else None,
            program=_clean(line.program, MAX_PROGRAM),
            message=_clean(line.message, MAX_MESSAGE, TRUNCATED_MARK),
        )
        for line in lines
    ]
    if not rows:
        return 0
    if machine is not None:
        if machine.id is None:
            session.flush()
            for row in rows:
                row.machine_id = machine.id
        last = session.scalar(
            select(InstallLog.at)
            .where(InstallLog.machine_id == machine.id)
            .order_by(InstallLog.id.desc())
            .limit(1)
        )
        if last is None or last < now - LOG_STARTED_GAP:
            first = rows[0]
            text = f"{first.program}: {first.message}" if first.program else first.message
            record_event(
                session, machine, actor or source, "installer-log-started",
                f"installer log started ({source} from {client}): {text[:200]}",
                {"source": source, "client": client, "program": first.program},
            )
    session.add_all(rows)
    return len(rows)


def read_install_logs(
    session: Session,
    machine_id: int | None,
    since_id: int = 0,
    limit: int = DEFAULT_READ_LIMIT,
) -> list[InstallLog]:
    """Lines of ``machine_id`` (None: lines of no machine) with id > ``since_id``, oldest
    first, at most ``limit``: follow a log by passing the last id seen."""
    where = (InstallLog.machine_id.is_(None) if machine_id is None
             else InstallLog.machine_id == machine_id)
    return list(session.scalars(
        select(InstallLog).where(where, InstallLog.id > since_id)
        .order_by(InstallLog.id).limit(max(0, limit))
    ))


def _trim_one(session: Session, machine_id: int | None, keep: int) -> int:
    where = (InstallLog.machine_id.is_(None) if machine_id is None
             else InstallLog.machine_id == machine_id)
    # The id of the newest line that no longer fits; it and everything older go.
    cut = session.scalar(
        select(InstallLog.id).where(where).order_by(InstallLog.id.desc())
        .offset(max(0, keep)).limit(1)
    )
    if cut is None:
        return 0
    result = session.execute(
        delete(InstallLog).where(where, InstallLog.id <= cut)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)


def trim_install_logs(
    session: Session,
    max_per_machine: int = DEFAULT_MAX_LINES_PER_MACHINE,
    machine_ids: Iterable[int | None] | None = None,
    max_unmatched: int | None = None,
) -> int:
    """Delete the oldest lines beyond ``max_per_machine`` per machine; return how many.

    ``machine_ids``: only these machines (None in it: the unmatched lines, capped at
    ``max_unmatched``); omitted: every machine over the cap (one grouped scan, for
    maintenance). ``max_unmatched`` None: the unmatched lines are capped like a machine.
    """
    unmatched_cap = max_per_machine if max_unmatched is None else max_unmatched
    if machine_ids is None:
        over = session.execute(
            select(InstallLog.machine_id).group_by(InstallLog.machine_id)
            .having(func.count(InstallLog.id) > min(max_per_machine, unmatched_cap))
        )
        machine_ids = [row[0] for row in over]
    deleted = 0
    for mid in dict.fromkeys(machine_ids):
        deleted += _trim_one(session, mid, unmatched_cap if mid is None else max_per_machine)
    return deleted
