"""Database access: engine, sessions and schema migrations.

Embedded SQLite (WAL) by default, any SQLAlchemy URL (PostgreSQL) by setting. The schema
is owned by Alembic: ``migrate()`` brings any database to the newest revision and never
drops data.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.orm import Session, sessionmaker

from appliance.models import Counter, utcnow

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def make_engine(url: str, extra_pragmas: list[str] | None = None) -> Engine:
    """Create an engine; for SQLite, create the directory and switch to WAL.

    A plain ``postgresql://`` URL uses psycopg 3, the driver the appliance depends on.
    ``extra_pragmas`` (SQLite): run on every new connection after the standard ones; the
    list is read at each connect, so a pragma appended later applies to later connections.
    """
    extra = extra_pragmas if extra_pragmas is not None else []
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            for pragma in extra:
                cur.execute(pragma)
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


class Database:
    """An engine and its session factory. Create one per process, after any fork."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._sqlite_pragmas: list[str] = []
        self.engine = make_engine(url, self._sqlite_pragmas)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def add_sqlite_pragma(self, pragma: str) -> None:
        """Run ``pragma`` on every SQLite connection from now on (no-op elsewhere, and
        when already added). Pooled connections are dropped so none is left without it."""
        if self.engine.dialect.name != "sqlite" or pragma in self._sqlite_pragmas:
            return
        self._sqlite_pragmas.append(pragma)
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        with self.sessions() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def migrate(self) -> None:
        migrate(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()


def _alembic_config(engine: Engine):  # type: ignore[no-untyped-def]
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["engine"] = engine
    return cfg


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade the schema to ``revision`` (idempotent)."""
    from alembic import command

    command.upgrade(_alembic_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def publish_counters(db: Database, part: str, values: Mapping[str, int]) -> None:
    """Store a part's running totals so other processes (CLI, web) can read them."""
    with db.session() as session:
        existing = {
            c.name: c for c in session.scalars(select(Counter).where(Counter.part == part))
        }
        now = utcnow()
        for name, value in values.items():
            row = existing.get(name)
            if row is None:
                session.add(Counter(part=part, name=name, value=int(value), updated_at=now))
            elif row.value != value:
                row.value = int(value)
                row.updated_at = now


def read_counters(db: Database) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    with db.session() as session:
        for c in session.scalars(select(Counter).order_by(Counter.part, Counter.name)):
            out.setdefault(c.part, {})[c.name] = c.value
    return out
