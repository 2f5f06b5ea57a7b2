from sqlalchemy import inspect

from appliance.db import Database, current_revision, publish_counters, read_counters
from appliance.lifecycle import record_seen


def test_migrate_is_idempotent_and_counters_roundtrip(database_url: str) -> None:
    db = Database(database_url)
    db.migrate()
    db.migrate()
    assert current_revision(db.engine) == "0001"
    if database_url.startswith("sqlite"):
        with db.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    tables = set(inspect(db.engine).get_table_names())
    assert {"subnets", "reservations", "leases", "machines", "events", "counters"} <= tables
    publish_counters(db, "dhcp", {"received": 3, "dropped_malformed": 1})
    publish_counters(db, "dhcp", {"received": 5, "dropped_malformed": 1})
    assert read_counters(db) == {"dhcp": {"dropped_malformed": 1, "received": 5}}
    db.dispose()


def test_record_seen_registers_once(database_url: str) -> None:
    db = Database(database_url)
    db.migrate()
    with db.session() as s:
        first = record_seen(s, "52:54:00:00:00:AA", "br0", "dhcp", arch="bios")
    with db.session() as s:
        again = record_seen(s, "52-54-00-00-00-aa", "relay 10.0.0.1", "dhcp")
        assert again.id == first.id
        assert again.seen_on == "relay 10.0.0.1" and again.arch == "bios"
        assert [e.kind for e in again.events] == ["discovered"]
    db.dispose()
