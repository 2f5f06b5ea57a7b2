"""Installer syslog in network namespaces with real senders: util-linux ``logger`` (UDP and
TCP, RFC 3164 and 5424) and busybox ``syslogd -R`` + ``busybox logger`` (what
debian-installer runs with ``log_host=``/``log_port=``).

The server namespace runs ``appliance serve --only syslog`` on the default port 514 with
a bridge (10.250.30.1/24); the installer namespace (10.250.30.2, which holds a lease of
a known machine) and a stranger namespace (10.250.30.3, no lease) hang off it by veth.
Every process is stopped by PID, and the namespaces are deleted afterwards.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from appliance.db import Database, read_counters
from appliance.models import Event, InstallLog, Lease, Machine, Subnet, utcnow
from tests import netns
from tests.conftest import ApplianceProcess, _fresh_pg_database, _pg_admin_url, require_root

SERVER = "10.250.30.1"
INSTALLER = "10.250.30.2"
STRANGER = "10.250.30.3"
MAC = "52:54:00:30:00:02"
PORT = "514"


@dataclass
class Env:
    server: netns.Namespace
    installer: netns.Namespace
    stranger: netns.Namespace
    app: ApplianceProcess
    db: Database
    machine_id: int

    def rows(self, token: str) -> list[InstallLog]:
        with self.db.session() as s:
            return list(s.scalars(select(InstallLog).where(InstallLog.message.contains(token))
                                  .order_by(InstallLog.id)))

    def wait_rows(self, token: str, n: int = 1, timeout: float = 15) -> list[InstallLog]:
        netns.wait_for(lambda: len(self.rows(token)) >= n, timeout,
                       what=f"{n} line(s) with {token!r}; log:\n{self.app.log()[-2000:]}")
        return self.rows(token)

    def counters(self) -> dict[str, int]:
        return read_counters(self.db).get("syslog", {})

    def logger(self, ns: netns.Namespace, *args: str) -> None:
        ns.exec(["logger", "-n", SERVER, "-P", PORT, *args], timeout=20)


def _database_url(kind: str, work: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{work / 'state' / 'appliance.db'}"
    admin = _pg_admin_url()
    if not admin:
        if os.environ.get("CI"):
            pytest.fail("APPLIANCE_TEST_PG_URL not set in CI: PostgreSQL tests cannot run")
        pytest.skip("APPLIANCE_TEST_PG_URL not set (tests/run-all.sh sets it)")
    return _fresh_pg_database(admin)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def env(request, tmp_path_factory) -> Iterator[Env]:  # type: ignore[no-untyped-def]
    require_root()
    work = tmp_path_factory.mktemp(f"syslog-{request.param}")
    url = _database_url(request.param, work)
    db = Database(url)
    db.migrate()
    with db.session() as s:
        subnet = Subnet(network="10.250.30.0/24")
        machine = Machine(mac=MAC, state="installing", bootenv="debian-12")
        s.add_all([subnet, machine])
        s.flush()
        s.add(Lease(ip=INSTALLER, mac=MAC, subnet_id=subnet.id, state="bound",
                    expires_at=utcnow() + dt.timedelta(hours=1)))
        machine_id = machine.id
    namespaces: list[netns.Namespace] = []
    app = None
    try:
        server = netns.new_namespace()
        namespaces.append(server)
        netns.bridge(server, "br0", f"{SERVER}/24")
        clients = []
        for i, addr in enumerate((INSTALLER, STRANGER)):
            ns = netns.new_namespace()
            namespaces.append(ns)
            netns.veth(server, f"sl{i}", ns, "eth0")
            server.ip("link", "set", f"sl{i}", "master", "br0")
            ns.ip("addr", "add", f"{addr}/24", "dev", "eth0")
            clients.append(ns)
        config = (f'state_dir = "{work / "state"}"\ndatabase_url = "{url}"\n'
                  "[syslog]\nmax_unmatched_lines = 100\n")
        app = ApplianceProcess(server, work, config, only=["syslog"])
        app.start()
        app.wait_log("syslog receiving installer logs on 0.0.0.0:514", timeout=60)
        yield Env(server, clients[0], clients[1], app, db, machine_id)
    finally:
        if app is not None:
            app.stop()
        for ns in reversed(namespaces):
            ns.delete()
        db.dispose()


def token() -> str:
    return secrets.token_hex(6)


@pytest.mark.parametrize("fmt, transport", [
    ("--rfc3164", ["-d"]),
    ("--rfc5424", ["-d"]),
    ("--rfc3164", ["-T"]),                        # TCP, newline framing (rsyslog's default)
    ("--rfc5424", ["-T", "--octet-count"]),       # TCP, RFC 6587 octet counting
])
def test_util_linux_logger_lines_land_on_the_machine(env: Env, fmt: str,
                                                     transport: list[str]) -> None:
    t = token()
    env.logger(env.installer, *transport, fmt, "-t", "anaconda", "-i", "-p", "local1.warning",
               f"storage configuration failed {t}")
    env.logger(env.installer, *transport, fmt, "-t", "anaconda", "-p", "user.debug", f"dbg {t}")
    first, second = env.wait_rows(t, 2)
    assert first.machine_id == env.machine_id
    assert (first.program, first.severity, first.message) == (
        "anaconda", 4, f"storage configuration failed {t}")
    assert (second.program, second.severity, second.message) == ("anaconda", 7, f"dbg {t}")
    assert first.source == "syslog" and first.client == INSTALLER
    assert abs(first.at - utcnow()) < dt.timedelta(minutes=1)


def test_debian_installer_busybox_syslogd_remote(env: Env, tmp_path: Path) -> None:
    """debian-installer starts ``syslogd -R log_host:log_port``; its programs log with
    busybox ``logger -t``. syslogd replaces /dev/log, so it runs under a private tmpfs
    /dev in its own mount namespace (the host's /dev is never touched)."""
    busybox = shutil.which("busybox")
    if busybox is None:
        if os.environ.get("CI"):
            pytest.fail("busybox (busybox-static) is not installed")
        pytest.skip("busybox not installed (apt-get install busybox-static)")
    t = token()
    script = tmp_path / "d-i.sh"
    script.write_text(f"""set -e
mount -t tmpfs aptest-dev /dev
mknod -m 666 /dev/null c 1 3
{busybox} syslogd -n -R {SERVER}:{PORT} &
syslogd=$!
i=0
while [ ! -S /dev/log ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
{busybox} logger -t main-menu -p user.info "INFO: Menu item 'netcfg' selected {t}"
{busybox} logger -t net/hw-detect.hotplug -p user.notice "Detected interface eth0 {t}"
{busybox} logger -t in-target -p user.err "E: Unable to locate package foo {t}"
sleep 1
kill $syslogd
wait $syslogd || true
""")
    env.installer.exec(["unshare", "--mount", "--propagation", "private", "sh", str(script)],
                       timeout=30)
    rows = env.wait_rows(t, 3)
    assert [(r.program, r.severity, r.message) for r in rows] == [
        ("main-menu", 6, f"INFO: Menu item 'netcfg' selected {t}"),
        ("net/hw-detect.hotplug", 5, f"Detected interface eth0 {t}"),
        ("in-target", 3, f"E: Unable to locate package foo {t}"),
    ]
    assert {r.machine_id for r in rows} == {env.machine_id}
    # One "installer-log-started" event for the machine, not one per line.
    with env.db.session() as s:
        started = list(s.scalars(select(Event).where(Event.machine_id == env.machine_id,
                                                     Event.kind == "installer-log-started")))
    assert len(started) == 1
    assert started[0].actor == "syslog"


def test_garbage_is_counted_as_malformed_and_the_server_keeps_answering(env: Env) -> None:
    before = env.counters()
    sender = (
        "import os, socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"a = ('{SERVER}', {PORT})\n"
        "s.sendto(b'\\x8a' + os.urandom(300), a)\n"
        "s.sendto(b'', a)\n"
        "s.sendto(b'<13>' + b'x' * 9 * 1024, a)\n"
        "s.sendto(b'\\n', a)\n"
    )
    env.installer.exec(["python3", "-c", sender])
    t = token()
    env.logger(env.installer, "-d", "--rfc3164", "-t", "after-garbage", f"still here {t}")
    (row,) = env.wait_rows(t)
    assert row.program == "after-garbage" and row.machine_id == env.machine_id

    def counted() -> bool:
        c = env.counters()
        return c.get("malformed", 0) - before.get("malformed", 0) >= 4
    netns.wait_for(counted, 15, what="malformed counted: " + str(env.counters()))
    c, b = env.counters(), before
    assert c["malformed_no_pri"] - b.get("malformed_no_pri", 0) == 1
    assert c["malformed_empty"] - b.get("malformed_empty", 0) == 2
    assert c["malformed_oversized"] - b.get("malformed_oversized", 0) == 1
    assert env.app.proc is not None and env.app.proc.poll() is None
    assert "Traceback" not in env.app.log()


def test_line_from_an_address_without_lease_is_kept_unmatched(env: Env) -> None:
    before = env.counters().get("unmatched", 0)
    t = token()
    env.logger(env.stranger, "-d", "--rfc5424", "-t", "subiquity", f"who am I {t}")
    (row,) = env.wait_rows(t)
    assert row.machine_id is None and row.client == STRANGER
    assert row.program == "subiquity"
    netns.wait_for(lambda: env.counters().get("unmatched", 0) > before, 15,
                   what="unmatched counted")
