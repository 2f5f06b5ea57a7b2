"""The database side of the DHCP part: load subnets, reservations and leases; persist
lease changes with group commit.

The in-memory ``LeaseTable`` is the authority while the server runs; the database is
where it comes from at start and where every bound/released/declined lease goes, in one
transaction per batch of packets, before the ACKs that confirm them are sent.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select

from appliance.db import Database
from appliance.dhcp.codec import int_to_ip, ip_to_int
from appliance.dhcp.leases import LeaseEntry, LeaseTable, Reservation, SubnetInfo
from appliance.mac import normalize_mac
from appliance.models import Lease
from appliance.models import Reservation as ReservationRow
from appliance.models import Subnet as SubnetRow

log = logging.getLogger("appliance.dhcp")

EPOCH = dt.datetime(1970, 1, 1)


def to_datetime(t: float) -> dt.datetime:
    return EPOCH + dt.timedelta(seconds=t)


def to_epoch(d: dt.datetime) -> float:
    if d.tzinfo is not None:
        d = d.astimezone(dt.UTC).replace(tzinfo=None)
    return (d - EPOCH).total_seconds()


def _ip_or_zero(text: str | None) -> int:
    return ip_to_int(text) if text else 0


def subnet_info(row: SubnetRow, reservations: Sequence[ReservationRow]) -> SubnetInfo:
    import ipaddress

    net = ipaddress.IPv4Network(row.network, strict=False)
    info = SubnetInfo(
        id=row.id,
        network=int(net.network_address),
        prefix=net.prefixlen,
        pool_start=_ip_or_zero(row.pool_start),
        pool_end=_ip_or_zero(row.pool_end),
        router=_ip_or_zero(row.router),
        dns=tuple(ip_to_int(x.strip()) for x in (row.dns_servers or "").split(",") if x.strip()),
        domain=row.domain_name or "",
        lease_seconds=int(row.lease_seconds or 3600),
        next_server=_ip_or_zero(row.next_server),
        cidr=str(net),
    )
    if info.pool_start and not info.pool_end:
        info.pool_end = info.broadcast - 1
    for ip in (info.router, info.next_server):
        if ip:
            info.excluded.add(ip)
    for r in reservations:
        info.add_reservation(Reservation(normalize_mac(r.mac), ip_to_int(r.ip), r.hostname))
    return info


def subnet_signature(db: Database) -> tuple[Any, ...]:
    """Everything about subnets and reservations that matters, to notice changes."""
    with db.session() as s:
        subs = tuple(s.execute(select(
            SubnetRow.id, SubnetRow.network, SubnetRow.pool_start, SubnetRow.pool_end,
            SubnetRow.router, SubnetRow.dns_servers, SubnetRow.domain_name,
            SubnetRow.lease_seconds, SubnetRow.next_server).order_by(SubnetRow.id)))
        res = tuple(s.execute(select(
            ReservationRow.id, ReservationRow.mac, ReservationRow.ip, ReservationRow.hostname,
            ReservationRow.subnet_id).order_by(ReservationRow.id)))
    return subs, res


def load_subnets(db: Database) -> list[SubnetInfo]:
    with db.session() as s:
        rows = list(s.scalars(select(SubnetRow).order_by(SubnetRow.id)))
        res: dict[int, list[ReservationRow]] = {}
        for r in s.scalars(select(ReservationRow)):
            res.setdefault(r.subnet_id, []).append(r)
        out = []
        for row in rows:
            try:
                out.append(subnet_info(row, res.get(row.id, [])))
            except ValueError as exc:
                log.error("subnet %s is invalid, ignored: %s", row.network, exc)
        return out


def load_leases(db: Database, table: LeaseTable) -> int:
    n = 0
    with db.session() as s:
        for row in s.scalars(select(Lease)):
            table.load(LeaseEntry(
                ip=ip_to_int(row.ip), mac=row.mac, subnet_id=row.subnet_id, state=row.state,
                starts=to_epoch(row.starts_at), expires=to_epoch(row.expires_at),
                hostname=row.hostname, client_id=row.client_id))
            n += 1
    return n


LeaseRow = tuple[str, str, int, str, "str | None", "str | None", float, float, float]


def lease_row(e: LeaseEntry, now: float) -> LeaseRow:
    """A snapshot of one entry for the database (times still epoch seconds)."""
    return (int_to_ip(e.ip), e.mac, e.subnet_id, e.state, e.hostname, e.client_id,
            e.starts, e.expires, now)


_COLUMNS = ("ip", "mac", "subnet_id", "state", "hostname", "client_id", "starts_at",
            "expires_at", "updated_at")
#: One statement for SQLite (>= 3.24) and PostgreSQL; placeholders filled per dialect.
_UPSERT = (
    f"INSERT INTO leases ({', '.join(_COLUMNS)}) VALUES ({{marks}}) "
    "ON CONFLICT (ip) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS[1:])
)


_SECONDS_TEXT: dict[int, str] = {}


def _sqlite_time(t: float) -> str:
    # The exact text SQLAlchemy's SQLite DateTime type writes (and reads back). The
    # rows of one commit share a few distinct seconds: format each second once.
    micro = round(t * 1e6)
    sec, micro = divmod(micro, 1_000_000)
    text = _SECONDS_TEXT.get(sec)
    if text is None:
        if len(_SECONDS_TEXT) > 64:
            _SECONDS_TEXT.clear()
        text = _SECONDS_TEXT[sec] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(sec))
    return f"{text}.{micro:06d}"


#: WAL pages after which a connection of the DHCP part checkpoints on commit. SQLite's
#: default (1000) has the packet thread checkpoint, with two fsyncs, every ten to twenty
#: group commits under load, stalling the answers for milliseconds each time; with 10000
#: (a WAL of up to 40 MiB) it checkpoints a tenth as often and copies each page once per
#: checkpoint however often it was rewritten. Durability is unchanged: a commit is in
#: the WAL either way, and a checkpoint only moves pages into the database file.
WAL_AUTOCHECKPOINT_PAGES = 10000
_WAL_PRAGMA = f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}"


def tune_connections(db: Database) -> None:
    """Set the DHCP part's SQLite checkpoint interval on every connection it opens
    (its lease writes and its housekeeping share the WAL; either may checkpoint)."""
    db.add_sqlite_pragma(_WAL_PRAGMA)


class LeaseWriter:
    """``write_leases`` for the packet loop: on SQLite through one DBAPI connection kept
    for the purpose (a group commit then costs the driver's executemany and commit,
    not SQLAlchemy's connection checkout, transaction and cursor machinery each time);
    on other databases ``write_leases`` itself."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.sqlite = db.engine.dialect.name == "sqlite"
        self._conn: Any = None
        self._sql = _UPSERT.format(marks=", ".join("?" * len(_COLUMNS)))

    def write(self, rows: Sequence[LeaseRow]) -> None:
        if not self.sqlite:
            write_leases(self.db, rows)
            return
        if not rows:
            return
        if self._conn is None:
            self._conn = self.db.engine.raw_connection()
        conn = self._conn
        try:
            cur = conn.cursor()
            try:
                cur.executemany(self._sql, _sqlite_params(rows))
            finally:
                cur.close()
            conn.commit()
        except Exception:
            self._conn = None
            try:
                conn.rollback()
            finally:
                conn.close()  # back to the pool; the next write takes a fresh one
            raise

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()


def _sqlite_params(rows: Sequence[LeaseRow]) -> list[tuple[Any, ...]]:
    unique = list({r[0]: r for r in rows}.values())  # one row per address per statement
    texts: dict[float, str] = {}  # the rows of a batch share most of their times

    def text(t: float) -> str:
        s = texts.get(t)
        if s is None:
            s = texts[t] = _sqlite_time(t)
        return s

    return [(*r[:6], text(r[6]), text(r[7]), text(r[8])) for r in unique]


def write_leases(db: Database, rows: Sequence[LeaseRow]) -> None:
    """Upsert lease rows (one per address) in one transaction.

    SQLite and PostgreSQL get ``INSERT .. ON CONFLICT`` straight through the driver
    (SQLAlchemy's per-row statement processing would cost more than the rest of the
    packet path); other databases a portable ORM upsert.
    """
    if not rows:
        return
    dialect = db.engine.dialect.name
    if dialect == "sqlite":
        sql = _UPSERT.format(marks=", ".join("?" * len(_COLUMNS)))
        with db.engine.begin() as conn:
            conn.exec_driver_sql(sql, _sqlite_params(rows))
        return
    unique = list({r[0]: r for r in rows}.values())  # one row per address per statement
    converted = [(*r[:6], to_datetime(r[6]), to_datetime(r[7]), to_datetime(r[8]))
                 for r in unique]
    if dialect == "postgresql":
        sql = _UPSERT.format(marks=", ".join(["%s"] * len(_COLUMNS)))
        with db.engine.begin() as conn:
            conn.exec_driver_sql(sql, converted)  # psycopg 3: pipelined executemany
        return
    with db.session() as s:
        for r in converted:
            values = dict(zip(_COLUMNS, r, strict=True))
            row = s.scalar(select(Lease).where(Lease.ip == values["ip"]))
            if row is None:
                s.add(Lease(**values))
            else:
                for k, v in values.items():
                    setattr(row, k, v)
