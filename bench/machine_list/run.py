#!/usr/bin/env python3
"""Machine list benchmark: the API and the web UI's machine list with up to 10,000 machines.

The operators' machine list (``GET /api/v1/machines`` and ``GET /ui/machines``) must
stay fast as the fleet grows, which it can only do if it paginates in SQL: a page of 50
costs the same few queries whether there are ten machines or ten thousand. This script
measures whether it does, for several fleet sizes in one run (default 10, 1,000 and
10,000 machines in embedded SQLite). For each size it builds a fresh temporary appliance
(state directory, SQLite database migrated by the appliance's own code), inserts the
machines with SQLAlchemy bulk inserts (mixed lifecycle states, a bound lease each in one
/16 subnet, 5 events each so the list's "last event" lookup has real work), creates a
user and an API token, starts ``appliance serve --only http`` on loopback with the
default workers and times seven list requests, sequentially over keep-alive connections
from this process: median and p90 of ``--repeat`` runs, body size and row count.

Every response is checked (status 200, expected row count and total, ordering at the
ends); a wrong one aborts the run. See ``bench/machine_list/README.md``. Run from the
repository root, serialised with the other benchmarks::

    flock /tmp/appliance-bench.lock python3 bench/machine_list/run.py

Exit status: 0 when the benchmark ran (whatever the figures), 1 when a response was
wrong (status or rows), 2 when setup failed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

# The appliance and its dependencies are imported after the path is set.
import sqlalchemy  # noqa: E402
from sqlalchemy import event, insert  # noqa: E402

from appliance.auth.tokens import create_token  # noqa: E402
from appliance.auth.users import add_user  # noqa: E402
from appliance.config import Config  # noqa: E402
from appliance.db import Database  # noqa: E402
from appliance.inventory import add_subnet  # noqa: E402
from appliance.lifecycle.states import STATES  # noqa: E402
from appliance.listing import MachineFilter, machine_page  # noqa: E402
from appliance.models import Event, Lease, Machine, utcnow  # noqa: E402

HOST = "127.0.0.1"
#: The UI's page size (``appliance/web/ui/pages.py``) and the API's default limit.
PAGE = 50
SEARCH = "node0099"
USER = "bench"
PASSWORD = "bench-machine-list-password"
#: Share of each lifecycle state in the fleet: mostly installed machines, some spare,
#: a few new, in flight or failed, as in a running data centre.
STATE_WEIGHTS = {"discovered": 5, "available": 15, "provisioning": 4, "installing": 6,
                 "ready": 65, "failed": 5}
PHASE = {"provisioning": "boot", "installing": "installer"}
BOOTENVS = ("rocky-9", "debian-12", "ubuntu-24.04", "alma-9")
SUBNET = "10.60.0.0/16"
#: The newest event of a machine in each state (the list's "last event" column).
LAST_EVENT = {
    "discovered": ("checkin", "dhcp", "seen again on eth1"),
    "available": ("state", "user:ops", "ready -> available: decommissioned"),
    "provisioning": ("state", "user:ops", "available -> provisioning/boot: reimage"),
    "installing": ("state", "http", "provisioning/boot -> installing/installer: booted"),
    "ready": ("state", "lifecycle", "installing/contract -> ready: contract passed"),
    "failed": ("state", "lifecycle", "installing/contract -> failed: contract check failed"),
}


class SetupError(RuntimeError):
    """The test bed could not be set up; the run is not meaningful."""


class CheckError(RuntimeError):
    """A response was wrong (status, rows, totals, order): the figures would mislead."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- fixtures


@dataclass
class Fleet:
    """What was inserted: enough to know what every list request must return."""

    n: int
    states: dict[str, int]
    hostnames: list[str]
    insert_s: float
    events: int
    #: API token of the bench user (``Authorization: Bearer``).
    token: str

    def matching(self, text: str) -> int:
        """Machines whose hostname contains ``text`` (MACs and bootenvs here cannot)."""
        return sum(1 for h in self.hostnames if text in h)


def mac_of(i: int) -> str:
    return f"52:54:00:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}"


def ip_of(i: int) -> str:
    """Machine ``i`` (from 1)'s address in the /16: hosts .1-.250 of 10.60.1.0/24 on."""
    h = i - 1
    return f"10.60.{1 + h // 250}.{1 + h % 250}"


def populate(db: Database, n: int) -> Fleet:
    """``n`` machines, a bound lease each and 5 events each, by bulk inserts.

    Only the subnet, the user and the token go through the appliance's functions (they are
    one row each); the bulk rows carry every column the list reads. The events are
    inserted in 5 fleet-wide rounds, so one machine's events are not adjacent in the
    table, as after a real week of DHCP, boots and installs.
    """
    rng = random.Random(20261123 + n)
    names, weights = list(STATE_WEIGHTS), list(STATE_WEIGHTS.values())
    states = rng.choices(names, weights, k=n)
    now = utcnow()
    start = now - dt.timedelta(days=30)
    expires = now + dt.timedelta(days=1)
    with db.session() as s:
        subnet_id = add_subnet(s, SUBNET, pool="10.60.1.1-10.60.254.254", router="10.60.0.1",
                               next_server="10.60.0.2", actor="bench").id
    machines: list[dict[str, Any]] = []
    leases: list[dict[str, Any]] = []
    for i in range(1, n + 1):
        state = states[i - 1]
        seen = start + dt.timedelta(seconds=i * 7)
        bootenv = "discovery" if state == "discovered" else BOOTENVS[i % len(BOOTENVS)]
        deployed = state not in ("discovered", "available")
        bmc = i % 10 < 7  # 70% have a BMC the appliance drives
        hostname = f"node{i:05d}"
        machines.append({
            "id": i, "mac": mac_of(i), "hostname": hostname, "state": state,
            "bootenv": bootenv, "arch": "uefi-x64" if i % 4 else "bios",
            "first_seen_at": seen, "last_seen_at": seen + dt.timedelta(days=20),
            "seen_on": "eth1" if i % 3 else "relay 10.60.0.1", "created_at": seen,
            "profiles": ["site-fra1", f"rack-r{i % 40 + 1:02d}"],
            "params": {"asset_tag": f"FRA1-{i:06d}"}, "state_serial": 4 if deployed else 1,
            "phase": PHASE.get(state),
            "phase_started_at": now - dt.timedelta(minutes=5) if state in PHASE else None,
            "state_reason": {"failed": "contract check failed: ssh port 22 closed",
                             "ready": "contract passed"}.get(state),
            "instance_id": f"i-{i:016x}" if deployed else None,
            "deployment": {"bootenv": bootenv, "actor": "user:ops", "reason": "rack build",
                           "at": (seen + dt.timedelta(days=1)).isoformat()}
            if deployed else None,
            "bmc_driver": "ipmi" if bmc else None,
            "bmc_address": f"10.61.{1 + (i - 1) // 250}.{1 + (i - 1) % 250}" if bmc else None,
            "bmc_username": "admin" if bmc else None,
            "power_state": ("on" if state != "available" else "off") if bmc else None,
            "power_checked_at": now - dt.timedelta(minutes=2) if bmc else None,
        })
        leases.append({"ip": ip_of(i), "mac": mac_of(i), "subnet_id": subnet_id,
                       "state": "bound", "hostname": hostname, "starts_at": now,
                       "expires_at": expires, "updated_at": now})

    def event_rows(round_no: int) -> Iterator[dict[str, Any]]:
        for i in range(1, n + 1):
            state = states[i - 1]
            env = machines[i - 1]["bootenv"]
            at = start + dt.timedelta(seconds=i * 7, hours=round_no * 20)
            kind, actor, message, details = [
                ("registered", "dhcp", "registered, seen on eth1", {"arch": "uefi-x64"}),
                ("state", "user:ops", "discovered -> available: accepted", {"serial": 1}),
                ("boot-script", "http", f"served boot script for bootenv {env}",
                 {"bootenv": env, "client": ip_of(i)}),
                ("answer-file", "http", f"served ks.cfg for bootenv {env}",
                 {"file": "ks.cfg", "bootenv": env, "client": ip_of(i)}),
                (*LAST_EVENT[state], {"serial": 4}),
            ][round_no]
            yield {"machine_id": i, "at": at, "actor": actor, "kind": kind,
                   "message": message, "details": details}

    t0 = time.perf_counter()
    with db.session() as s:
        s.execute(insert(Machine), machines)
        s.execute(insert(Lease), leases)
        for round_no in range(5):
            s.execute(insert(Event), list(event_rows(round_no)))
    insert_s = time.perf_counter() - t0
    with db.session() as s:
        user = add_user(s, USER, PASSWORD, actor="bench")
        token = create_token(s, user, actor="bench", label="bench/machine_list")[1]
    counts = dict.fromkeys(STATES, 0)
    for state in states:
        counts[state] += 1
    return Fleet(n, counts, [m["hostname"] for m in machines], insert_s, 5 * n, token)


def checkpoint(db: Database) -> None:
    """Fold the WAL into the database file, so its size is the data's."""
    with db.engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")


# --------------------------------------------------------------------------- in-process


@contextmanager
def capture_sql(engine: sqlalchemy.Engine) -> Iterator[list[tuple[str, Any]]]:
    """Every statement (and its parameters) sent to the database in the block."""
    seen: list[tuple[str, Any]] = []

    def before(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any,
               _many: bool) -> None:
        seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", before)


@dataclass
class InProcess:
    """``machine_page()`` called directly: the SQL and summaries without HTTP or render."""

    ms: dict[str, float] = field(default_factory=dict)  # filter label -> median ms
    statements: dict[str, int] = field(default_factory=dict)
    plans: list[str] = field(default_factory=list)


def in_process(db: Database, fleet: Fleet, repeat: int, plans: bool) -> InProcess:
    """Median time and statement count of ``machine_page`` for the listing's filters.

    Tells the SQL side of a request apart from Flask, JSON and Jinja2. With ``plans``
    (the largest fleet), each statement of the default page, the last page and the search
    is replayed through the driver alone (median of ``repeat``) and shown with SQLite's
    EXPLAIN QUERY PLAN: the statements are the ones captured, not rebuilt, so this says
    which of them grows with the fleet, and why.
    """
    n = fleet.n
    filters = {
        "default page": MachineFilter(),
        "last page": MachineFilter(offset=max(0, n - PAGE)),
        f"q={SEARCH}": MachineFilter(q=SEARCH),
        "state=ready": MachineFilter(state="ready"),
    }
    result = InProcess()
    for label, flt in filters.items():
        times = []
        for k in range(repeat + 2):  # 2 warm-up calls
            with capture_sql(db.engine) as sql, db.session() as s:
                t0 = time.perf_counter()
                machine_page(s, flt)
                elapsed = time.perf_counter() - t0
            if k >= 2:
                times.append(elapsed)
        result.ms[label] = statistics.median(times) * 1000
        result.statements[label] = len(sql)
        if plans and label != "state=ready":
            result.plans.append(f"  {label}:")
            with db.engine.connect() as conn:
                for statement, params in sql:
                    args = tuple(params or ())
                    replay = []
                    for _ in range(repeat):
                        t0 = time.perf_counter()
                        rows = len(conn.exec_driver_sql(statement, args).fetchall())
                        replay.append(time.perf_counter() - t0)
                    plan = "; ".join(row[-1] for row in conn.exec_driver_sql(
                        "EXPLAIN QUERY PLAN " + statement, args))
                    words = statement.split()
                    what = " ".join(words[:2] + ["..."] + words[words.index("FROM"):][:2]) \
                        if "FROM" in words else " ".join(words[:4])
                    result.plans.append(f"    {statistics.median(replay) * 1000:6.2f} ms "
                                        f"{rows:>5} rows  {what[:48]:<48} {plan}")
    return result


# --------------------------------------------------------------------------- HTTP


class Connection(http.client.HTTPConnection):
    """``http.client`` keep-alive connection that counts its (re)connects."""

    connects = 0

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        Connection.connects += 1


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    seconds: float


class Client:
    """One keep-alive connection with a cookie jar and fixed headers (API token)."""

    def __init__(self, port: int, headers: dict[str, str] | None = None) -> None:
        self.conn = Connection(HOST, port, timeout=120)
        self.headers = {"User-Agent": "bench-machine-list", **(headers or {})}
        self.cookies: dict[str, str] = {}

    def close(self) -> None:
        self.conn.close()

    def request(self, method: str, path: str, form: dict[str, str] | None = None) -> Reply:
        headers = dict(self.headers)
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        body = None
        if form is not None:
            body = urllib.parse.urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        for attempt in (0, 1):
            try:
                t0 = time.perf_counter()
                self.conn.request(method, path, body=body, headers=headers)
                resp = self.conn.getresponse()
                data = resp.read()
                elapsed = time.perf_counter() - t0
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # An idle keep-alive connection the server closed: retry once, fresh.
                self.conn.close()
                if attempt:
                    raise
        for cookie in resp.headers.get_all("Set-Cookie") or []:
            name, _, rest = cookie.partition("=")
            value = rest.split(";", 1)[0]
            if value:
                self.cookies[name.strip()] = value
            else:
                self.cookies.pop(name.strip(), None)
        return Reply(resp.status, resp.headers, data, elapsed)

    def get(self, path: str) -> Reply:
        return self.request("GET", path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """``appliance serve --only http`` in its own process group, stopped by its PID."""

    def __init__(self, conf: Path, log_path: Path) -> None:
        self.log_path = log_path
        self.handle = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "--config", str(conf), "serve",
             "--only", "http"], stdin=subprocess.DEVNULL, stdout=self.handle,
            stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=REPO)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, port: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SetupError(f"appliance exited with {self.proc.returncode}:\n"
                                 f"{self.log_tail()}")
            client = Client(port)
            try:
                if client.get("/ui/login").status == 200:
                    return
            except OSError:
                pass
            finally:
                client.close()
            time.sleep(0.2)
        raise SetupError(f"appliance not answering on port {port} after {timeout} s:\n"
                         f"{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM to the PID (gunicorn's master), SIGKILL to the group after 15 s."""
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                log("appliance did not stop in 15 s; killing its process group")
        try:  # whatever is left of its process group (e.g. gunicorn workers)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(5)
        self.handle.close()


def log_in(port: int) -> Client:
    """A UI client with a login session: the form's CSRF token, then name and password."""
    client = Client(port)
    page = client.get("/ui/login")
    found = re.search(rb'name="csrf_token" value="([^"]+)"', page.body)
    if page.status != 200 or not found:
        raise SetupError(f"GET /ui/login: {page.status}, csrf_token field "
                         f"{'found' if found else 'missing'}")
    reply = client.request("POST", "/ui/login", {
        "csrf_token": found.group(1).decode(), "next": "/ui/machines", "name": USER,
        "password": PASSWORD})
    if reply.status not in (302, 303):
        raise SetupError(f"POST /ui/login answered {reply.status}, not a redirect")
    check = client.get("/ui/machines")
    if check.status != 200 or b"<h1>Machines" not in check.body:
        raise SetupError(f"GET /ui/machines after login: {check.status}")
    return client


# --------------------------------------------------------------------------- requests


@dataclass
class Expect:
    rows: int
    total: int
    first: str | None = None  # hostname of the first row
    last: str | None = None  # hostname of the last row


@dataclass
class Request:
    """One measured list request: where it goes and what it must return for a fleet."""

    key: str
    label: str
    api: bool
    path: Callable[[Fleet], str]
    expect: Callable[[Fleet], Expect]


def last_page(n: int) -> int:
    return max(1, -(-n // PAGE))


def host(i: int) -> str:
    return f"node{i:05d}"


def _first_page(f: Fleet) -> Expect:
    return Expect(min(PAGE, f.n), f.n, host(1) if f.n else None)


REQUESTS = [
    Request("a", "(a) API /api/v1/machines", True, lambda f: "/api/v1/machines",
            _first_page),
    Request("b", "(b) API ?limit=500", True, lambda f: "/api/v1/machines?limit=500",
            lambda f: Expect(min(500, f.n), f.n, host(1) if f.n else None)),
    Request("c", "(c) API ?offset=N-50 (last page)", True,
            lambda f: f"/api/v1/machines?offset={max(0, f.n - PAGE)}",
            lambda f: Expect(f.n - max(0, f.n - PAGE), f.n, None,
                             host(f.n) if f.n else None)),
    Request("d", f"(d) API ?q={SEARCH}", True, lambda f: f"/api/v1/machines?q={SEARCH}",
            lambda f: Expect(min(PAGE, f.matching(SEARCH)), f.matching(SEARCH))),
    Request("e", "(e) UI /ui/machines", False, lambda f: "/ui/machines", _first_page),
    Request("f", "(f) UI ?page=LAST", False,
            lambda f: f"/ui/machines?page={last_page(f.n)}",
            lambda f: Expect(f.n - (last_page(f.n) - 1) * PAGE, f.n, None,
                             host(f.n) if f.n else None)),
    Request("g", "(g) UI ?state=ready", False, lambda f: "/ui/machines?state=ready",
            lambda f: Expect(min(PAGE, f.states["ready"]), f.states["ready"])),
]

UI_ROW = re.compile(rb'<tr data-mac="[^"]*">\s*<td>.*?</td>\s*<td><a href="[^"]*">([^<]*)</a>',
                    re.S)
UI_TOTAL = re.compile(rb"<h1>Machines <small>(\d+)</small>")


def check(req: Request, reply: Reply, want: Expect) -> int:
    """Raise CheckError unless the reply is what the fleet says; return its row count."""
    where = f"{req.label} ({req.key})"
    if reply.status != 200:
        raise CheckError(f"{where}: status {reply.status}: {reply.body[:200]!r}")
    if req.api:
        data = json.loads(reply.body)
        names = [item["hostname"] for item in data["items"]]
        total = data["total"]
    else:
        names = [m.decode() for m in UI_ROW.findall(reply.body)]
        found = UI_TOTAL.search(reply.body)
        total = int(found.group(1)) if found else -1
    if len(names) != want.rows or total != want.total:
        raise CheckError(f"{where}: {len(names)} rows of total {total}, expected "
                         f"{want.rows} of {want.total}")
    if want.first and names[0] != want.first or want.last and names[-1] != want.last:
        raise CheckError(f"{where}: rows {names[:1]}..{names[-1:]}, expected "
                         f"{want.first or '...'}..{want.last or '...'}")
    return len(names)


@dataclass
class Measured:
    times: list[float]
    bytes: int
    rows: int

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times) * 1000

    @property
    def p90_ms(self) -> float:
        return statistics.quantiles(self.times, n=10, method="inclusive")[8] * 1000


def measure(port: int, fleet: Fleet, repeat: int,
            warmup: int) -> dict[str, Measured]:
    """Every request ``warmup`` times, then ``repeat`` rounds of all of them in turn.

    Interleaved rounds (not 30 of one, then 30 of the next) so that a change in the
    shared machine's load hits every request alike. One keep-alive connection for the
    API (bearer token) and one for the UI (login session), used one request at a time.
    """
    api = Client(port, {"Authorization": f"Bearer {fleet.token}", "Accept": "application/json"})
    ui = log_in(port)
    wanted = {r.key: r.expect(fleet) for r in REQUESTS}
    paths = {r.key: r.path(fleet) for r in REQUESTS}
    out: dict[str, Measured] = {}
    try:
        for req in REQUESTS:
            for _ in range(warmup):
                check(req, (api if req.api else ui).get(paths[req.key]), wanted[req.key])
        for _ in range(repeat):
            for req in REQUESTS:
                reply = (api if req.api else ui).get(paths[req.key])
                rows = check(req, reply, wanted[req.key])
                m = out.setdefault(req.key, Measured([], len(reply.body), rows))
                m.times.append(reply.seconds)
                m.bytes = len(reply.body)
    finally:
        api.close()
        ui.close()
    return out


# --------------------------------------------------------------------------- one size


@dataclass
class SizeResult:
    fleet: Fleet
    measured: dict[str, Measured]
    db_bytes: int
    inproc: InProcess
    connects: int


def run_size(top: Path, n: int, args: argparse.Namespace, plans: bool) -> SizeResult:
    """A fresh appliance with ``n`` machines, measured over HTTP, then stopped."""
    work = top / f"n{n}"
    state_dir = work / "state"
    state_dir.mkdir(parents=True)
    config = Config(state_dir=str(state_dir), log_level="WARNING")
    db = Database(config.effective_database_url)
    server: Server | None = None
    try:
        db.migrate()
        log(f"n={n:,}: inserting machines, leases and events in {work}")
        fleet = populate(db, n)
        checkpoint(db)
        db_bytes = (state_dir / "appliance.db").stat().st_size
        log(f"n={n:,}: inserted in {fleet.insert_s:.1f} s, database {db_bytes:,} bytes; "
            f"in-process machine_page()")
        inproc = in_process(db, fleet, args.repeat, plans)
        db.dispose()  # the server gets the database to itself
        port = free_port()
        conf = work / "appliance.toml"
        conf.write_text(f"""\
# Written by bench/machine_list/run.py: HTTP only, loopback, default workers.
state_dir = "{state_dir}"
log_level = "WARNING"
[http]
bind = "{HOST}"
port = {port}
""")
        log(f"n={n:,}: starting appliance serve --only http on {HOST}:{port}")
        server = Server(conf, work / "appliance.log")
        server.wait_ready(port)
        Connection.connects = 0
        log(f"n={n:,}: {len(REQUESTS)} requests x ({args.warmup} warm-up + "
            f"{args.repeat})")
        measured = measure(port, fleet, args.repeat, args.warmup)
        return SizeResult(fleet, measured, db_bytes, inproc, Connection.connects)
    finally:
        if server is not None:
            server.stop()
        db.dispose()


# --------------------------------------------------------------------------- report


def git_head() -> str:
    res = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--",
                            "appliance"], capture_output=True, text=True).stdout.strip()
    return (res.stdout.strip() or "?") + (" + uncommitted changes" if dirty else "")


def fs_type(path: Path) -> str:
    res = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    return res.stdout.strip() or "?"


def short(n: int) -> str:
    """10000 -> 10k (for a column header)."""
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def report(results: list[SizeResult], args: argparse.Namespace) -> None:
    sizes = [r.fleet.n for r in results]
    # Growth between the two largest fleets: both fill every page, so only N differs
    # (against 10 machines, pages of 10 rows would be compared with pages of 50).
    ratio_label = f"{short(sizes[-1])}/{short(sizes[-2])}" if len(sizes) > 1 else ""
    cell = 29  # "median  p90  bytes  rows" per size
    head = f"{'request':<34}" + "".join(f"{f'N = {n:,}':>{cell}}" for n in sizes)
    if len(sizes) > 1:
        head += f"{'growth':>9}"
    sub = f"{'':<34}" + f"{'med ms':>7}{'p90 ms':>7}{'bytes':>9}{'rows':>6}" * len(sizes)
    if len(sizes) > 1:
        sub += f"{ratio_label:>9}"
    print(f"\nOver HTTP, loopback, one keep-alive client at a time; {args.repeat} timed "
          f"requests each after {args.warmup} warm-up;")
    print("med/p90: milliseconds from sending the request to the end of the body; bytes: "
          "body; rows: items / table rows"
          + (f";\ngrowth: median at N = {sizes[-1]:,} / median at N = {sizes[-2]:,}"
             if len(sizes) > 1 else ""))
    print(head)
    print(sub)
    print("-" * len(sub))
    for req in REQUESTS:
        line = f"{req.label:<34}"
        for r in results:
            m = r.measured[req.key]
            line += f"{m.median_ms:>7.1f}{m.p90_ms:>7.1f}{m.bytes:>9,}{m.rows:>6}"
        if len(sizes) > 1:
            prev, last = results[-2].measured[req.key], results[-1].measured[req.key]
            line += f"{last.median_ms / prev.median_ms:>8.1f}x"
        print(line)
    print("-" * len(sub))

    def extra(label: str, values: list[str]) -> None:
        print(f"{label:<34}" + "".join(f"{v:>{cell}}" for v in values))

    extra("database file (after checkpoint)", [f"{r.db_bytes:,} bytes" for r in results])
    extra("insert (machines+leases+events)", [
        f"{r.fleet.insert_s:.2f} s, {r.fleet.n + r.fleet.n + r.fleet.events:,} rows"
        for r in results])
    extra("ready machines (g's total)", [f"{r.fleet.states['ready']:,}" for r in results])
    extra("TCP connections opened", [f"{r.connects}" for r in results])
    labels = list(results[0].inproc.ms)
    print(f"\nIn-process machine_page() (SQL + row summaries, no HTTP, JSON or template); "
          f"median of {args.repeat}, ms, and SQL statements per call; growth {ratio_label}")
    for label in labels:
        line = f"  {label:<32}"
        for r in results:
            line += f"{f'{r.inproc.ms[label]:.1f} ms, {r.inproc.statements[label]} stmts':>{cell}}"
        if len(sizes) > 1:
            ratio = results[-1].inproc.ms[label] / results[-2].inproc.ms[label]
            line += f"{ratio:>8.1f}x"
        print(line)
    if results[-1].inproc.plans:
        print(f"\nStatements of machine_page() at N = {sizes[-1]:,}, replayed through the "
              f"driver (median of {args.repeat}), with SQLite's query plan:")
        for line in results[-1].inproc.plans:
            print(line)


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,1000,10000",
                        help="machine counts, comma separated (default 10,1000,10000)")
    parser.add_argument("--repeat", type=int, default=30,
                        help="timed requests per request kind and size (default 30)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed (but checked) requests first (default 3)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory (databases, server logs)")
    args = parser.parse_args()
    try:
        sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        parser.error(f"--sizes: integers, comma separated, not {args.sizes!r}")
    if not sizes or min(sizes) < 1 or max(sizes) > 60000 or args.repeat < 2:
        parser.error("need --sizes from 1 to 60000 (addresses in one /16) and --repeat >= 2")

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    load_before = os.getloadavg()
    started = time.monotonic()
    top = Path(tempfile.mkdtemp(prefix="bench-machine-list-"))
    results: list[SizeResult] = []
    try:
        for n in sizes:
            results.append(run_size(top, n, args, plans=n == max(sizes)))
        load_after = os.getloadavg()
        print("bench/machine_list: machine list, JSON API and web UI, embedded SQLite")
        print(f"  appliance: git {git_head()}; Python {sys.version.split()[0]}, "
              f"SQLAlchemy {sqlalchemy.__version__}, SQLite {sqlalchemy_sqlite_version()}")
        print(f"  {os.cpu_count()} CPUs, load average {load_before[0]:.2f} before / "
              f"{load_after[0]:.2f} after (1 min); state in {top} ({fs_type(top)})")
        print(f"  appliance serve --only http on {HOST}, default workers (2 gthread); "
              f"fleet: states {', '.join(f'{k} {v}%' for k, v in STATE_WEIGHTS.items())}, "
              f"hostnames node00001.., a bound lease each in {SUBNET}, 5 events each")
        report(results, args)
        print(f"\ntotal {time.monotonic() - started:.0f} s")
        return 0
    except CheckError as exc:
        log(f"CHECK FAILED: {exc}")
        return 1
    except (SetupError, OSError, sqlalchemy.exc.SQLAlchemyError) as exc:
        log(f"setup failed: {type(exc).__name__}: {exc}")
        return 2
    except KeyboardInterrupt:
        log("interrupted")
        return 2
    finally:
        if args.keep:
            log(f"kept {top}")
        else:
            shutil.rmtree(top, ignore_errors=True)


def sqlalchemy_sqlite_version() -> str:
    import sqlite3

    return sqlite3.sqlite_version


if __name__ == "__main__":
    sys.exit(main())
