"""appliance.installlogs: attribution by lease, bounded rows, the log-started event,
reading and retention, on an in-memory SQLite database."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select

from appliance.db import Database
from appliance.installlogs import (
    MAX_MESSAGE,
    LogLine,
    machine_for_address,
    read_install_logs,
    record_install_lines,
    trim_install_logs,
)
from appliance.models import Event, InstallLog, Lease, Machine, Subnet, utcnow


@pytest.fixture
def db() -> Iterator[Database]:
    database = Database("sqlite://")
    database.migrate()
    yield database
    database.dispose()


def add_machine(db: Database, mac: str, ip: str | None, state: str = "bound",
                expires_in: float = 3600) -> int:
    with db.session() as s:
        subnet = s.scalar(select(Subnet))
        if subnet is None:
            subnet = Subnet(network="10.250.0.0/24")
            s.add(subnet)
            s.flush()
        machine = Machine(mac=mac, state="installing")
        s.add(machine)
        if ip:
            s.add(Lease(ip=ip, mac=mac, subnet_id=subnet.id, state=state,
                        expires_at=utcnow() + dt.timedelta(seconds=expires_in)))
        s.flush()
        return machine.id


def lines(n: int, prefix: str = "line") -> list[LogLine]:
    return [LogLine(severity=6, program="main-menu", message=f"{prefix} {i}") for i in range(n)]


def test_machine_for_address_needs_a_current_lease(db: Database) -> None:
    bound = add_machine(db, "52:54:00:00:00:01", "10.250.0.11")
    offered = add_machine(db, "52:54:00:00:00:02", "10.250.0.12", state="offered")
    add_machine(db, "52:54:00:00:00:03", "10.250.0.13", state="released")
    add_machine(db, "52:54:00:00:00:04", "10.250.0.14", expires_in=-5)
    with db.session() as s:
        assert machine_for_address(s, "10.250.0.11").id == bound
        assert machine_for_address(s, "::ffff:10.250.0.11").id == bound
        # an offered address is not yet the machine's: a spoofed sender could claim it
        assert offered and machine_for_address(s, "10.250.0.12") is None
        assert machine_for_address(s, "10.250.0.13") is None
        assert machine_for_address(s, "10.250.0.14") is None
        assert machine_for_address(s, "10.250.0.99") is None
        assert machine_for_address(s, "not an address") is None


def test_lease_without_machine_row_is_no_machine(db: Database) -> None:
    add_machine(db, "52:54:00:00:00:01", None)
    with db.session() as s:
        s.add(Lease(ip="10.250.0.20", mac="52:54:00:00:00:09", subnet_id=1, state="bound",
                    expires_at=utcnow() + dt.timedelta(hours=1)))
    with db.session() as s:
        assert machine_for_address(s, "10.250.0.20") is None


def test_lines_are_stored_bounded_and_read_in_order(db: Database) -> None:
    mid = add_machine(db, "52:54:00:00:00:01", "10.250.0.11")
    at = dt.datetime(2026, 1, 2, 3, 4, 5)
    with db.session() as s:
        m = s.get(Machine, mid)
        n = record_install_lines(s, m, "syslog", "10.250.0.11", [
            LogLine(3, "in-target", "E: Unable to locate package foo", at),
            LogLine(None, "p" * 200, "x" * 10_000),
            LogLine(99, "nul\x00prog", "a\x00b"),
        ])
        assert n == 3
    with db.session() as s:
        rows = read_install_logs(s, mid)
        assert [r.severity for r in rows] == [3, None, None]
        assert rows[0].program == "in-target" and rows[0].at == at
        assert rows[0].source == "syslog" and rows[0].client == "10.250.0.11"
        assert rows[1].program == "p" * 64
        assert len(rows[1].message) == MAX_MESSAGE
        assert rows[1].message.endswith("[truncated]")
        assert rows[1].at is not None and abs(rows[1].at - utcnow()) < dt.timedelta(minutes=1)
        assert rows[2].program == "nul\ufffdprog" and rows[2].message == "a\ufffdb"
        # follow: only what came after the last id seen, and at most `limit`
        assert [r.id for r in read_install_logs(s, mid, since_id=rows[0].id)] == [
            rows[1].id, rows[2].id]
        assert len(read_install_logs(s, mid, limit=1)) == 1
        assert read_install_logs(s, mid + 1) == []


def test_unknown_source_is_refused(db: Database) -> None:
    with db.session() as s, pytest.raises(ValueError, match="source"):
        record_install_lines(s, None, "carrier-pigeon", "10.0.0.1", lines(1))


def test_unmatched_lines_are_stored_without_machine(db: Database) -> None:
    mid = add_machine(db, "52:54:00:00:00:01", "10.250.0.11")
    with db.session() as s:
        assert record_install_lines(s, None, "upload", "10.250.0.99", lines(2)) == 2
    with db.session() as s:
        assert [r.message for r in read_install_logs(s, None)] == ["line 0", "line 1"]
        assert read_install_logs(s, mid) == []
        assert s.scalar(select(func.count(Event.id))) == 0


def events(db: Database, mid: int) -> list[Event]:
    with db.session() as s:
        return list(s.scalars(select(Event).where(Event.machine_id == mid,
                                                  Event.kind == "installer-log-started")))


def test_log_started_event_once_per_install_not_per_line(db: Database) -> None:
    mid = add_machine(db, "52:54:00:00:00:01", "10.250.0.11")
    for batch in range(3):
        with db.session() as s:
            record_install_lines(s, s.get(Machine, mid), "syslog", "10.250.0.11",
                                 lines(5, f"batch{batch}"))
    started = events(db, mid)
    assert len(started) == 1
    assert started[0].actor == "syslog"
    assert "main-menu: batch0 0" in started[0].message
    assert started[0].details["client"] == "10.250.0.11"
    # Eleven minutes of silence: the next line starts a new install log.
    with db.session() as s:
        for row in s.scalars(select(InstallLog)):
            row.at = row.at - dt.timedelta(minutes=11)
    with db.session() as s:
        record_install_lines(s, s.get(Machine, mid), "upload", "10.250.0.11", lines(1, "again"))
    started = events(db, mid)
    assert len(started) == 2 and "again 0" in started[1].message


def test_trim_keeps_the_newest_lines_per_machine(db: Database) -> None:
    a = add_machine(db, "52:54:00:00:00:01", "10.250.0.11")
    b = add_machine(db, "52:54:00:00:00:02", "10.250.0.12")
    with db.session() as s:
        record_install_lines(s, s.get(Machine, a), "syslog", "10.250.0.11", lines(30, "a"))
        record_install_lines(s, s.get(Machine, b), "syslog", "10.250.0.12", lines(5, "b"))
        record_install_lines(s, None, "syslog", "10.250.0.99", lines(8, "u"))
    with db.session() as s:
        assert trim_install_logs(s, 10, [a], max_unmatched=3) == 20
    with db.session() as s:
        assert [r.message for r in read_install_logs(s, a)] == [f"a {i}" for i in range(20, 30)]
        assert len(read_install_logs(s, None)) == 8            # not asked for
        assert trim_install_logs(s, 10, [None, b], max_unmatched=3) == 5
        assert [r.message for r in read_install_logs(s, None)] == ["u 5", "u 6", "u 7"]
        assert len(read_install_logs(s, b)) == 5
        assert trim_install_logs(s, 4, max_unmatched=3) == 7    # every machine over the cap
        assert [r.message for r in read_install_logs(s, a)] == [f"a {i}" for i in range(26, 30)]
        assert [r.message for r in read_install_logs(s, b)] == [f"b {i}" for i in range(1, 5)]
        assert trim_install_logs(s, 4, max_unmatched=3) == 0


def test_lines_go_with_their_machine(db: Database) -> None:
    mid = add_machine(db, "52:54:00:00:00:01", "10.250.0.11")
    with db.session() as s:
        record_install_lines(s, s.get(Machine, mid), "syslog", "10.250.0.11", lines(3))
    with db.session() as s:
        s.delete(s.get(Machine, mid))
    with db.session() as s:
        assert s.scalar(select(func.count(InstallLog.id))) == 0
