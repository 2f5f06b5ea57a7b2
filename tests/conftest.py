"""Shared fixtures: tier markers by folder, databases (SQLite and PostgreSQL), the appliance
running inside a network namespace."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import netns

TESTS = Path(__file__).parent


def pytest_collection_modifyitems(config, items):  # type: ignore[no-untyped-def]
    for item in items:
        tier = Path(str(item.fspath)).relative_to(TESTS).parts[0]
        if tier in ("unit", "integration", "e2e"):
            item.add_marker(getattr(pytest.mark, tier))


def _pg_admin_url() -> str | None:
    """PostgreSQL server for tests, from APPLIANCE_TEST_PG_URL (set by tests/run-all.sh).

    Use a Unix-socket URL (``?host=/var/run/postgresql``) so an appliance inside a network
    namespace reaches the server too.
    """
    return os.environ.get("APPLIANCE_TEST_PG_URL")


def _fresh_pg_database(admin_url: str) -> str:
    """Create an empty database on the test PostgreSQL server; return its URL."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"aptest_{secrets.token_hex(4)}"
    url = make_url(admin_url).set(drivername="postgresql+psycopg")
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:  # type: ignore[no-untyped-def]
    """A fresh, empty database URL: embedded SQLite and real PostgreSQL.

    PostgreSQL is required in CI (tests/run-all.sh starts it); a developer run without
    APPLIANCE_TEST_PG_URL skips those cases, and says so.
    """
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'appliance.db'}"
    admin = _pg_admin_url()
    if not admin:
        if os.environ.get("CI"):
            pytest.fail("APPLIANCE_TEST_PG_URL not set in CI: PostgreSQL tests cannot run")
        pytest.skip("APPLIANCE_TEST_PG_URL not set (tests/run-all.sh sets it)")
    return _fresh_pg_database(admin)


def require_root() -> None:
    if not netns.have_root_netns():
        if os.environ.get("CI"):
            pytest.fail("integration tests need root and iproute2")
        pytest.skip("needs root for network namespaces")


class ApplianceProcess:
    """``appliance serve`` inside a namespace, with its own config, state dir and log."""

    def __init__(self, ns: netns.Namespace, workdir: Path, config_toml: str,
                 only: list[str] | None = None) -> None:
        self.ns = ns
        self.workdir = workdir
        self.config_path = workdir / "appliance.toml"
        self.config_path.write_text(config_toml)
        self.log_path = workdir / "appliance.log"
        self.only = only
        self.proc: subprocess.Popen | None = None
        self._api_token: str | None = None

    def cli(self, *args: str, check: bool = True, input: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
        """Run the appliance CLI against this instance's config (outside the namespace);
        ``input`` goes to its stdin (e.g. ``--password-stdin``)."""
        return subprocess.run(
            [sys.executable, "-m", "appliance.cli", "--config", str(self.config_path), *args],
            capture_output=True, text=True, check=check, timeout=timeout, input=input,
        )

    def start(self) -> None:
        cmd = [sys.executable, "-m", "appliance.cli", "--config", str(self.config_path), "serve"]
        for part in self.only or []:
            cmd += ["--only", part]
        self.proc = self.ns.popen(cmd, log=self.log_path)

    def stop(self) -> None:
        if self.proc is not None:
            self.ns.stop(self.proc, timeout=15)
            self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, needle: str, timeout: float = 30) -> None:
        netns.wait_for(lambda: needle in self.log(), timeout, what=f"{needle!r} in log:\n"
                       + self.log()[-3000:])

    def api_token(self) -> str:
        """An API token of user ``tester`` (made with the CLI the first time)."""
        if self._api_token is None:
            from tests.apiauth import PASSWORD

            self.cli("user", "add", "tester", "--password-stdin", input=PASSWORD + "\n")
            self._api_token = self.cli("token", "create", "tester").stdout.strip()
        return self._api_token

    def api_headers(self) -> list[str]:
        """curl arguments that authenticate as ``tester``."""
        return ["-H", f"Authorization: Bearer {self.api_token()}"]

    def http_get(self, url: str, timeout: float = 10, api: bool = False) -> bytes:
        """GET from inside the namespace (curl), return the body; ``api``: with a token."""
        out = self.ns.exec(["curl", "-sS", "-f", "--max-time", str(timeout),
                            *(self.api_headers() if api else []), url],
                           text=False, timeout=timeout + 5)
        return out.stdout


@pytest.fixture
def namespace() -> Iterator[netns.Namespace]:
    require_root()
    ns = netns.new_namespace()
    try:
        yield ns
    finally:
        ns.delete()


def wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except Exception:
            time.sleep(0.2)
    raise TimeoutError(url)
