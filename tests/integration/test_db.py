from sqlalchemy import inspect

from appliance.db import Database, current_revision, publish_counters, read_counters
from appliance.lifecycle import record_seen


def test_migrate_is_idempotent_and_counters_roundtrip(database_url: str) -> None:
    db = Database(database_url)
    db.migrate()
    db.migrate()
    assert current_revision(db.engine) == "0006_users_and_api_tokens"
    if database_url.startswith("sqlite"):
        with db.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    tables = set(inspect(db.engine).get_table_names())
    assert {"subnets", "reservations", "leases", "machines", "events", "counters",
            "profiles", "images", "install_logs", "power_requests"} <= tables
    # leases: found by address (unique) and MAC; no index on expires_at (0004)
    assert {ix["name"] for ix in inspect(db.engine).get_indexes("leases")} >= {"ix_leases_mac"}
    assert "ix_leases_expires_at" not in {
        ix["name"] for ix in inspect(db.engine).get_indexes("leases")}
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


def test_upgrade_from_0001_keeps_machines_and_matches_the_models(database_url: str) -> None:
    """An appliance running schema 0001 upgrades in place: its machines keep their rows and
    get empty profiles/params; afterwards the schema is exactly what the models say."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import text

    from appliance.db import migrate
    from appliance.models import Base

    db = Database(database_url)
    migrate(db.engine, "0001")
    with db.engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO machines (mac, state, bootenv, first_seen_at, last_seen_at, "
            "created_at) VALUES ('52:54:00:00:00:01', 'discovered', 'discovery', "
            "'2026-01-01', '2026-01-01', '2026-01-01')"))
    db.migrate()
    with db.session() as s:
        from appliance.models import Machine
        (machine,) = s.query(Machine).all()
        assert (machine.profiles, machine.params, machine.install_token) == ([], {}, None)
        assert (machine.bmc_driver, machine.bmc_verify_tls, machine.power_state) == \
            (None, True, None)
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    # server defaults the migration adds for existing rows are not differences that
    # matter; anything else (a missing table, column, index or constraint) is.
    assert [d for d in diff if not (isinstance(d, list) and d and d[0][0] ==
                                    "modify_default")] == []
    db.dispose()
