"""The syslog part's batching, unmatched cap and retention, and its message handling,
on an in-memory SQLite database with a fake clock (no sockets)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from sqlalchemy import event, func, select, text

from appliance.config import Config, SyslogConfig
from appliance.db import Database, read_counters
from appliance.installlogs import LogLine, read_install_logs
from appliance.models import Event, InstallLog, Lease, Machine, Subnet, utcnow
from appliance.syslog import batch as batch_mod
from appliance.syslog.batch import MAX_BATCH, MAX_DELAY, Batcher, new_counters
from appliance.syslog.server import SyslogServer


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def db() -> Iterator[Database]:
    database = Database("sqlite://")
    database.migrate()
    yield database
    database.dispose()


@pytest.fixture
def commits(db: Database) -> list[int]:
    seen: list[int] = []
    event.listen(db.engine, "commit", lambda _conn: seen.append(1))
    return seen


def add_machine(db: Database, mac: str, ip: str) -> int:
    with db.session() as s:
        subnet = s.scalar(select(Subnet))
        if subnet is None:
            subnet = Subnet(network="10.250.0.0/24")
            s.add(subnet)
            s.flush()
        machine = Machine(mac=mac, state="installing")
        s.add(machine)
        s.add(Lease(ip=ip, mac=mac, subnet_id=subnet.id, state="bound",
                    expires_at=utcnow() + dt.timedelta(hours=1)))
        s.flush()
        return machine.id


def count(db: Database, machine_id: int | None) -> int:
    with db.session() as s:
        where = (InstallLog.machine_id.is_(None) if machine_id is None
                 else InstallLog.machine_id == machine_id)
        return s.scalar(select(func.count(InstallLog.id)).where(where)) or 0


def line(i: int) -> LogLine:
    return LogLine(severity=6, program="anna", message=f"msg {i}")


def test_lines_wait_for_a_full_batch_or_the_delay(db: Database, commits: list[int]) -> None:
    mid = add_machine(db, "52:54:00:00:00:01", "10.250.0.11")
    clock = Clock()
    b = Batcher(db, SyslogConfig(), new_counters(), clock)
    assert not b.due() and b.wait_time() is None
    b.add("10.250.0.11", line(0))
    assert not b.due()
    assert b.wait_time() == pytest.approx(MAX_DELAY)
    clock.t += MAX_DELAY / 2
    assert not b.due()
    clock.t += MAX_DELAY / 2
    assert b.due()
    commits.clear()
    assert b.flush() == 1
    assert count(db, mid) == 1
    assert not b.due()
    # A flood: due as soon as MAX_BATCH lines wait, without waiting for the delay.
    for i in range(MAX_BATCH - 1):
        b.add("10.250.0.11", line(i))
    assert not b.due()
    b.add("10.250.0.11", line(MAX_BATCH))
    assert b.due()


def test_a_flood_is_one_commit_per_batch(db: Database, commits: list[int]) -> None:
    a = add_machine(db, "52:54:00:00:00:01", "10.250.0.11")
    c = add_machine(db, "52:54:00:00:00:02", "10.250.0.12")
    counters = new_counters()
    b = Batcher(db, SyslogConfig(), counters, Clock())
    for i in range(MAX_BATCH):
        b.add("10.250.0.11" if i % 2 else "10.250.0.12", line(i))
    b.add("10.250.0.99", line(-1))
    commits.clear()
    assert b.flush() == MAX_BATCH + 1
    assert len(commits) == 1
    assert counters["db_commits"] == 1 and counters["stored"] == MAX_BATCH + 1
    assert counters["unmatched"] == 1 and counters["unmatched_stored"] == 1
    assert count(db, a) == count(db, c) == MAX_BATCH // 2
    with db.session() as s:
        rows = read_install_logs(s, a)
        assert [r.message for r in rows[:2]] == ["msg 1", "msg 3"]      # order kept
        kinds = s.scalars(select(Event.kind).where(Event.kind == "installer-log-started"))
        assert len(list(kinds)) == 2                                     # one per machine


def test_unmatched_lines_are_capped_per_window(db: Database) -> None:
    clock = Clock()
    counters = new_counters()
    b = Batcher(db, SyslogConfig(max_unmatched_lines=5), counters, clock)
    for i in range(3):
        b.add("10.250.0.98", line(i))
    b.flush()
    for i in range(4):
        b.add("10.250.0.99", line(i))
    b.flush()
    assert count(db, None) == 5
    assert counters["unmatched"] == 7
    assert counters["unmatched_stored"] == 5 and counters["unmatched_dropped"] == 2
    # The next window stores again; retention keeps the newest 5 overall.
    clock.t += batch_mod.RETENTION_EVERY
    assert b.retention_due()
    b.retention()
    for i in range(3):
        b.add("10.250.0.97", line(100 + i))
    b.flush()
    assert count(db, None) == 8
    clock.t += batch_mod.RETENTION_EVERY
    b.retention()
    assert count(db, None) == 5
    with db.session() as s:
        assert [r.message for r in read_install_logs(s, None)][-3:] == [
            "msg 100", "msg 101", "msg 102"]


def test_unmatched_lines_can_be_dropped_entirely(db: Database) -> None:
    counters = new_counters()
    b = Batcher(db, SyslogConfig(max_unmatched_lines=0), counters, Clock())
    b.add("10.250.0.99", line(0))
    b.flush()
    assert count(db, None) == 0
    assert counters["unmatched_dropped"] == 1


def test_retention_trims_periodically_and_a_chatty_machine_at_once(db: Database) -> None:
    quiet = add_machine(db, "52:54:00:00:00:01", "10.250.0.11")
    chatty = add_machine(db, "52:54:00:00:00:02", "10.250.0.12")
    clock = Clock()
    counters = new_counters()
    b = Batcher(db, SyslogConfig(max_lines_per_machine=40), counters, clock)
    for i in range(45):
        b.add("10.250.0.11", line(i))
    b.flush()
    # 45 lines > a quarter of the cap: trimmed right after the batch, not per line.
    assert count(db, quiet) == 40
    for i in range(8):
        b.add("10.250.0.11", line(100 + i))
    b.flush()
    assert count(db, quiet) == 48                    # 8 <= 40 // 4: waits for the pass
    for i in range(11):
        b.add("10.250.0.12", line(i))
    b.flush()
    assert count(db, chatty) == 11
    clock.t += batch_mod.RETENTION_EVERY
    b.retention()
    assert count(db, quiet) == 40 and count(db, chatty) == 11
    assert counters["trimmed"] == 5 + 8
    with db.session() as s:
        assert read_install_logs(s, quiet)[-1].message == "msg 107"


def test_machine_lookups_are_cached_briefly(db: Database, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    add_machine(db, "52:54:00:00:00:01", "10.250.0.11")
    lookups: list[str] = []
    real = batch_mod.machine_for_address

    def counting(session, ip):  # type: ignore[no-untyped-def]
        lookups.append(ip)
        return real(session, ip)

    monkeypatch.setattr(batch_mod, "machine_for_address", counting)
    clock = Clock()
    b = Batcher(db, SyslogConfig(), new_counters(), clock)
    for _ in range(3):
        b.add("10.250.0.11", line(0))
        b.add("10.250.0.99", line(0))
        b.flush()
        clock.t += 1
    assert sorted(lookups) == ["10.250.0.11", "10.250.0.99"]
    clock.t += batch_mod.ADDRESS_TTL
    b.add("10.250.0.11", line(0))
    b.flush()
    assert len(lookups) == 3


def test_database_failure_loses_the_batch_but_not_the_part(db: Database) -> None:
    add_machine(db, "52:54:00:00:00:01", "10.250.0.11")
    counters = new_counters()
    b = Batcher(db, SyslogConfig(), counters, Clock())
    b.add("10.250.0.11", line(0))
    with db.engine.begin() as conn:
        conn.execute(text("ALTER TABLE install_logs RENAME TO install_logs_away"))
    assert b.flush() == 0
    assert counters["db_errors"] == 1 and counters["db_lost_lines"] == 1
    with db.engine.begin() as conn:
        conn.execute(text("ALTER TABLE install_logs_away RENAME TO install_logs"))
    b.add("10.250.0.11", line(1))
    assert b.flush() == 1


def test_server_handles_and_counts_every_kind_of_input(db: Database) -> None:
    mid = add_machine(db, "52:54:00:00:00:01", "10.250.0.11")
    server = SyslogServer(Config(), db)
    server.handle(b"<14>Nov 22 02:27:38 main-menu: INFO: Menu item netcfg selected\n",
                  "10.250.0.11")
    server.handle(b"<11>1 2026-11-22T02:27:38Z vm anaconda 12 - - failed", "10.250.0.11")
    server.handle(b"", "10.250.0.11")
    server.handle(b"\x8a\x13garbage", "10.250.0.11")
    server.handle(b"<13>" + b"z" * 9000, "10.250.0.11")
    server.handle(None, "10.250.0.11")                       # an oversized TCP frame
    server.batcher.flush()
    server.publish()
    c = server.counters
    assert c["received"] == 6
    assert c["malformed"] == 4
    assert (c["malformed_empty"], c["malformed_no_pri"], c["malformed_oversized"]) == (1, 1, 2)
    assert c["stored"] == 2
    with db.session() as s:
        rows = read_install_logs(s, mid)
    assert [(r.program, r.severity, r.message) for r in rows] == [
        ("main-menu", 6, "INFO: Menu item netcfg selected"), ("anaconda", 3, "failed")]
    published = read_counters(db)["syslog"]
    assert published["malformed"] == 4 and published["stored"] == 2
