#!/usr/bin/env python3
"""Answer-file rendering benchmark: kickstart and preseed for 1,000 machines.

Sets up a temporary appliance (embedded SQLite) with the ``global`` profile, three
profile layers (site, rack, role) and 1,000 machines, half ``rocky-9`` (``ks.cfg``) and
half ``debian-12`` (``preseed.cfg``), then measures:

1. in-process, single thread: ``render_machine_file`` per machine (the request path's
   database reads plus the template render), its parts, and the alternative of a fresh
   Jinja2 environment per request; template loads and compiles are counted, not assumed;
2. over HTTP: ``appliance serve --only http`` on loopback against nginx serving the same
   1,000 answer files pre-rendered to static files, with the same keep-alive clients.

See ``bench/render/README.md``. Run from the repository root, serialised with the other
benchmarks::

    flock /tmp/appliance-bench.lock python3 bench/render/run.py

Exit status: 0 when the benchmark ran (whatever the figures), 2 when setup failed.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import dataclasses
import datetime as dt
import hashlib
import itertools
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

# The appliance and its dependencies are imported after the path is set.
import jinja2  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from appliance.catalog import Catalog, load_catalog  # noqa: E402
from appliance.config import Config  # noqa: E402
from appliance.db import Database  # noqa: E402
from appliance.inventory import add_machine, add_subnet  # noqa: E402
from appliance.machinefiles import (  # noqa: E402
    BootTarget,
    machine_by_install_token,
    param_layers,
    render_context,
    render_machine_file,
)
from appliance.models import Event, Lease, Machine, utcnow  # noqa: E402
from appliance.paths import shipped_dir  # noqa: E402
from appliance.profiles import configure_machine, set_profile  # noqa: E402
from appliance.render import Renderer  # noqa: E402

#: bootenv -> the answer file its machines fetch.
ANSWER_FILES = {"rocky-9": "ks.cfg", "debian-12": "preseed.cfg"}
#: Steps of the staged row: session open, token lookup, render_context (profiles, params,
#: lease queries and the merge), template render, commit and close.
STAGES = ("session open", "token lookup", "render_context", "template render",
          "commit+close")
HOST = "127.0.0.1"


class SetupError(RuntimeError):
    """The test bed could not be set up; the run is not meaningful."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- fixtures


def fake_key(rng: random.Random, kind: str, comment: str) -> str:
    """An authorized_keys line of realistic length (random bytes, not a real key)."""
    if kind == "ssh-rsa":  # 4096-bit RSA: 535 bytes of key blob
        blob = b"\x00\x00\x00\x07ssh-rsa" + rng.randbytes(524)
    else:
        blob = b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + rng.randbytes(32)
    return f"{kind} {base64.b64encode(blob).decode()} {comment}"


@dataclass
class Target:
    """One machine's answer file: what a client fetches and what it must contain."""

    mac: str
    bootenv: str
    file: str
    token: str
    hostname: str

    @property
    def path(self) -> str:
        return f"/install/{self.token}/{self.file}"


def populate(db: Database, catalog: Catalog, machines: int) -> tuple[list[Target], list[str]]:
    """Profiles, a subnet with a bound lease per machine, and the machines themselves.

    Returns the targets and the 3 SSH keys (checked in the rendered files).
    """
    rng = random.Random(20261122)
    keys = [fake_key(rng, "ssh-ed25519", "ops@bastion1"),
            fake_key(rng, "ssh-ed25519", "ops@bastion2"),
            fake_key(rng, "ssh-rsa", "break-glass@vault")]
    racks = 10
    with db.session() as s:
        set_profile(s, catalog, "global", {
            "ssh_authorized_keys": keys, "timezone": "Etc/UTC", "locale": "en_US.UTF-8",
            "keyboard": "us"}, description="every machine")
        set_profile(s, catalog, "site-fra1", {
            "timezone": "Europe/Berlin",
            "ntp_servers": ["ntp1.fra1.example.net", "ntp2.fra1.example.net",
                            "ntp3.fra1.example.net"],
            "proxy": "http://proxy.fra1.example.net:3128"}, description="Frankfurt 1")
        for r in range(1, racks + 1):
            set_profile(s, catalog, f"rack-r{r:02d}", {
                "root_disk": "/dev/nvme0n1" if r % 2 else "/dev/sda",
                "rack_location": f"fra1/hall-b/row-{(r + 1) // 2}/r{r:02d}"})
        set_profile(s, catalog, "role-web-debian", {
            "mirror": "http://mirror.fra1.example.net/debian",
            "extra_packages": ["nginx", "prometheus-node-exporter", "chrony", "jq", "rsync",
                               "tmux", "lldpd"]})
        set_profile(s, catalog, "role-db-rocky", {
            "mirror": "http://mirror.fra1.example.net/rocky/9.4",
            "extra_packages": ["postgresql-server", "pcp", "chrony", "jq", "rsync", "tmux",
                               "lldpd"]})
        subnet = add_subnet(s, "10.40.0.0/20", pool="10.40.4.0-10.40.15.254",
                            router="10.40.0.1", next_server="10.40.0.2", actor="bench")
        subnet_id = subnet.id
    targets: list[Target] = []
    expires = utcnow() + dt.timedelta(days=1)
    batch = 100
    for start in range(0, machines, batch):
        with db.session() as s:
            for i in range(start, min(start + batch, machines)):
                rocky = i % 2 == 0
                bootenv = "rocky-9" if rocky else "debian-12"
                mac = f"02:42:0a:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}"
                hostname = f"{'db' if rocky else 'web'}-{i:04d}.fra1.example.net"
                machine = add_machine(s, mac, actor="bench")
                own: dict[str, Any] = {"hostname": hostname, "asset_tag": f"FRA1-{i:06d}"}
                if i % 3 == 0:
                    own["root_disk"] = "/dev/nvme1n1"  # a third override their rack's disk
                role = "role-db-rocky" if rocky else "role-web-debian"
                configure_machine(s, catalog, machine, bootenv=bootenv,
                                  profiles=["site-fra1", f"rack-r{i % racks + 1:02d}", role],
                                  values=own, actor="bench")
                ip = f"10.40.{4 + (i >> 8)}.{i & 255}"
                s.add(Lease(ip=ip, mac=mac, subnet_id=subnet_id, state="bound",
                            hostname=hostname.split(".")[0], expires_at=expires))
                assert machine.install_token
                targets.append(Target(mac, bootenv, ANSWER_FILES[bootenv],
                                      machine.install_token, hostname))
    return targets, keys


def check_params(config: Config, db: Database, catalog: Catalog, targets: list[Target],
                 keys: list[str], base_url: str) -> list[str]:
    """Required params satisfied for every machine; layering visible in the output."""
    lines = []
    from appliance.machinefiles import machine_params

    with db.session() as s:
        for name in ANSWER_FILES:
            env = catalog.bootenvs[name]
            required = [p for p, spec in env.params.items() if spec.required]
            ok = 0
            for t in (t for t in targets if t.bootenv == name):
                machine = s.scalar(select(Machine).where(Machine.mac == t.mac))
                assert machine is not None
                params = machine_params(s, env, machine)
                if all(p in params for p in required):
                    ok += 1
            count = sum(1 for t in targets if t.bootenv == name)
            lines.append(f"  {name}: required {', '.join(required) or '(none)'}: set for "
                         f"{ok}/{count} machines")
            if ok != count:
                raise SetupError(f"{name}: required params missing on {count - ok} machines")
        sample = targets[0]
        machine = s.scalar(select(Machine).where(Machine.mac == sample.mac))
        assert machine is not None
        where: dict[str, str] = {}
        for layer in param_layers(s, machine):
            for key in layer.values:
                where[key] = layer.label
        lines.append(f"  layers of {sample.mac} ({sample.bootenv}): " + ", ".join(
            f"{k} <- {v.removeprefix('profile ')}" for k, v in sorted(where.items())))
        target = BootTarget(base_url, HOST)
        for t in (targets[0], targets[1]):
            machine = s.scalar(select(Machine).where(Machine.mac == t.mac))
            assert machine is not None
            text = render_machine_file(config, s, catalog, machine, t.file, target)
            wanted = [*keys, t.hostname.split(".")[0], "Europe/Berlin", "lldpd",
                      "mirror.fra1.example.net", t.token]
            missing = [w[:30] for w in wanted if w not in text]
            if missing:
                raise SetupError(f"{t.file} of {t.mac} lacks layered values: {missing}")
    return lines


# --------------------------------------------------------------------------- counting


@dataclass
class JinjaCounts:
    get_source: int = 0
    parse: int = 0
    compile: int = 0

    def total(self) -> tuple[int, int, int]:
        return self.get_source, self.parse, self.compile


@contextmanager
def count_jinja() -> Iterator[JinjaCounts]:
    """Count template reads and compiles in this process, in every Jinja2 environment.

    Wraps ``FileSystemLoader.get_source`` (reads a template file), ``Environment._parse``
    (parses source) and ``Environment.compile`` (source to Python code) at class level.
    """
    counts = JinjaCounts()
    originals = (jinja2.FileSystemLoader.get_source, jinja2.Environment._parse,
                 jinja2.Environment.compile)

    def get_source(self, *a, **kw):  # type: ignore[no-untyped-def]
        counts.get_source += 1
        return originals[0](self, *a, **kw)

    def parse(self, *a, **kw):  # type: ignore[no-untyped-def]
        counts.parse += 1
        return originals[1](self, *a, **kw)

    def compile_(self, *a, **kw):  # type: ignore[no-untyped-def]
        counts.compile += 1
        return originals[2](self, *a, **kw)

    jinja2.FileSystemLoader.get_source = get_source  # type: ignore[method-assign]
    jinja2.Environment._parse = parse  # type: ignore[method-assign]
    jinja2.Environment.compile = compile_  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        (jinja2.FileSystemLoader.get_source, jinja2.Environment._parse,
         jinja2.Environment.compile) = originals  # type: ignore[method-assign]


class OpenWatch:
    """inotify IN_OPEN on directories: counts every open of a file in them, by any process.

    The appliance and the in-process renders use a private copy of bootenvs/ and
    templates/, so every open counted here is one of theirs.
    """

    IN_OPEN = 0x20
    IN_ISDIR = 0x40000000

    def __init__(self, dirs: list[Path]) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        for d in dirs:
            if self.libc.inotify_add_watch(self.fd, str(d).encode(), self.IN_OPEN) < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {d}")

    def drain(self) -> int:
        """File opens since the last drain."""
        opens = 0
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return opens
            offset = 0
            while offset < len(data):
                _wd, mask, _cookie, length = struct.unpack_from("iIII", data, offset)
                offset += 16 + length
                if mask & self.IN_OPEN and not mask & self.IN_ISDIR:
                    opens += 1

    def close(self) -> None:
        os.close(self.fd)


# --------------------------------------------------------------------------- in-process


@dataclass
class Timing:
    label: str
    per_file: dict[str, list[float]] = field(default_factory=dict)  # file -> pass rates
    overall: list[float] = field(default_factory=list)  # renders/s per pass
    counts: tuple[int, int, int] = (0, 0, 0)
    opens: int = 0
    n: int = 0

    def add_pass(self, seconds_by_file: dict[str, float], n_by_file: dict[str, int],
                 wall: float) -> None:
        for name, secs in seconds_by_file.items():
            self.per_file.setdefault(name, []).append(n_by_file[name] / secs)
        self.n = sum(n_by_file.values())
        self.overall.append(self.n / wall)


@dataclass
class Row:
    """One line of the in-process table: a function run over a list of targets."""

    label: str
    one: Callable[[Target], None]
    targets: list[Target]
    timing: Timing = field(init=False)

    def __post_init__(self) -> None:
        self.timing = Timing(self.label)


def timed_passes(rows: list[Row], passes: int, watch: OpenWatch) -> None:
    """A warm-up pass of each row (not counted), then ``passes`` passes, rows interleaved
    pass by pass so that a change in the machine's load hits every row alike.

    Template reads/parses/compiles (Python level) and template file opens (inotify) are
    counted per row over its measured passes only.
    """
    for row in rows:
        log(f"in-process: warm-up {row.label.strip()}")
        for t in row.targets[:100]:
            row.one(t)
    clock = time.perf_counter
    watch.drain()
    with count_jinja() as counts:
        for k in range(passes):
            log(f"in-process: pass {k + 1}/{passes}")
            for row in rows:
                before = counts.total()
                secs = dict.fromkeys(ANSWER_FILES.values(), 0.0)
                ns = dict.fromkeys(ANSWER_FILES.values(), 0)
                one = row.one
                start = clock()
                for t in row.targets:
                    t0 = clock()
                    one(t)
                    secs[t.file] += clock() - t0
                    ns[t.file] += 1
                row.timing.add_pass(secs, ns, clock() - start)
                after = counts.total()
                row.timing.counts = tuple(  # type: ignore[assignment]
                    c + (y - x) for c, x, y in zip(row.timing.counts, before, after,
                                                   strict=True))
                row.timing.opens += watch.drain()


def in_process(config: Config, db: Database, catalog: Catalog, targets: list[Target],
               passes: int, fresh_n: int, watch: OpenWatch,
               base_url: str) -> tuple[list[Timing], dict[str, float]]:
    target = BootTarget(base_url, HOST)
    def full(t: Target) -> None:
        with db.session() as s:
            machine = machine_by_install_token(s, t.token)
            assert machine is not None
            render_machine_file(config, s, catalog, machine, t.file, target)

    stages = dict.fromkeys(STAGES, 0.0)
    clock = time.perf_counter

    def staged(t: Target) -> None:
        # render_machine_file's answer-file path, step by step, with a clock between steps.
        t0 = clock()
        with db.session() as s:
            t1 = clock()
            machine = machine_by_install_token(s, t.token)
            assert machine is not None
            t2 = clock()
            bootenv = catalog.bootenvs[machine.bootenv]
            ctx = render_context(config, s, bootenv, machine, target)
            t3 = clock()
            catalog.renderer.render(bootenv.templates[t.file], machine.mac, ctx)
            t4 = clock()
        t5 = clock()
        for name, d in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            stages[name] += d

    contexts: dict[str, dict[str, Any]] = {}
    with db.session() as s:
        for t in targets:
            machine = machine_by_install_token(s, t.token)
            assert machine is not None
            contexts[t.token] = render_context(config, s, catalog.bootenvs[t.bootenv],
                                               machine, target)
    template_of = {t.token: catalog.bootenvs[t.bootenv].templates[t.file] for t in targets}

    def template_only(t: Target) -> None:
        catalog.renderer.render(template_of[t.token], t.mac, contexts[t.token])

    def fresh_env(t: Target) -> None:
        fresh = dataclasses.replace(catalog, renderer=Renderer(catalog.templates_dir))
        with db.session() as s:
            machine = machine_by_install_token(s, t.token)
            assert machine is not None
            render_machine_file(config, s, fresh, machine, t.file, target)

    from werkzeug.test import EnvironBuilder

    from appliance.web import create_app

    app = create_app(config, db)
    environs = {t.token: EnvironBuilder(path=t.path, base_url=base_url).get_environ()
                for t in spread(targets, fresh_n)}

    def start_response(status: str, headers: list[tuple[str, str]], *_: Any) -> None:
        if not status.startswith("200"):
            raise SetupError(f"Flask endpoint answered {status}")

    def endpoint(t: Target) -> None:
        # The WSGI app as gunicorn calls it (no test-client wrapping), fresh environ.
        body = app.wsgi_app(dict(environs[t.token]), start_response)
        try:
            for _chunk in body:
                pass
        finally:
            getattr(body, "close", lambda: None)()

    subset = spread(targets, fresh_n)
    rows = [
        Row("full path: session + token lookup + render_machine_file", full, targets),
        Row(f"  same + Flask app (WSGI), event row, commit ({fresh_n} m.)", endpoint, subset),
        Row("  same, timed in stages (split below)", staged, targets),
        Row("  part: template render only (prepared context)", template_only, targets),
        Row(f"fresh Jinja2 environment per request ({fresh_n} machines)", fresh_env, subset),
    ]
    timed_passes(rows, passes, watch)
    staged_calls = len(targets) * (passes + 1) - (len(targets) - min(100, len(targets)))
    split = {name: total / staged_calls * 1e6 for name, total in stages.items()}
    return [row.timing for row in rows], split


def spread(targets: list[Target], n: int) -> list[Target]:
    """``n`` targets spread over the list, as many of each bootenv."""
    groups = [[t for t in targets if t.bootenv == name] for name in ANSWER_FILES]
    per = max(1, n // len(groups))
    picked = [g[::max(1, len(g) // per)][:per] for g in groups]
    return [t for pair in itertools.zip_longest(*picked) for t in pair if t is not None]


# --------------------------------------------------------------------------- HTTP


class Conn:
    """A minimal HTTP/1.1 keep-alive client for GETs (cheaper per request than http.client)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None
        self.buf = b""

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((HOST, self.port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        return sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def get(self, path: str) -> tuple[int, bytes]:
        request = (f"GET {path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
                   f"User-Agent: bench-render\r\n\r\n").encode()
        for attempt in (0, 1):
            if self.sock is None:
                self.sock = self._connect()
            try:
                self.sock.sendall(request)
                return self._response()
            except (ConnectionError, EOFError):
                # An idle keep-alive connection the server closed: retry once, fresh.
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _fill(self) -> None:
        assert self.sock is not None
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed")
        self.buf += chunk

    def _response(self) -> tuple[int, bytes]:
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._fill()
        head = self.buf[:end].decode("latin-1").split("\r\n")
        self.buf = self.buf[end + 4:]
        status = int(head[0].split(" ", 2)[1])
        length = -1
        close = False
        for line in head[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        if length < 0:
            raise ValueError(f"no Content-Length in response: {head}")
        while len(self.buf) < length:
            self._fill()
        body, self.buf = self.buf[:length], self.buf[length:]
        if close:
            self.close()
        return status, body


def tree_cpu_seconds(root: int) -> float:
    """CPU time of ``root`` and its live descendants, every thread, from /proc (ns clock).

    ``schedstat``'s first field is the task's time on a CPU in nanoseconds; ``stat``'s
    utime/stime are in clock ticks (10 ms), too coarse for nginx's short passes.
    """
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                data = handle.read()
        except OSError:
            continue
        parent[int(entry)] = int(data[data.rindex(")") + 2:].split()[1])
    members = {root}
    changed = True
    while changed:
        changed = False
        for pid, ppid in parent.items():
            if ppid in members and pid not in members:
                members.add(pid)
                changed = True
    total = 0
    for pid in members:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as handle:
                    total += int(handle.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total / 1e9


@dataclass
class LoadRun:
    rate: float
    latencies: list[float]
    errors: int
    wall: float
    server_cpu: float
    client_cpu: float


def fetch_all(port: int, paths: list[str], clients: int, server_pid: int,
              expect: dict[str, bytes] | None = None) -> tuple[LoadRun, int]:
    """Every path once, by ``clients`` threads with a keep-alive connection each.

    Returns the run and, when ``expect`` is given, how many bodies differed from it.
    """
    counter = itertools.count()
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    mismatches = [0] * clients
    barrier = threading.Barrier(clients + 1)
    clock = time.perf_counter

    def worker(k: int) -> None:
        conn = Conn(port)
        mine = latencies[k]
        barrier.wait()
        try:
            while (i := next(counter)) < len(paths):
                path = paths[i]
                t0 = clock()
                try:
                    status, body = conn.get(path)
                except (OSError, EOFError, ValueError):
                    errors[k] += 1
                    conn.close()
                    continue
                mine.append(clock() - t0)
                if status != 200:
                    errors[k] += 1
                elif expect is not None and body != expect[path]:
                    mismatches[k] += 1
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for th in threads:
        th.start()
    cpu0 = tree_cpu_seconds(server_pid)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    barrier.wait()
    start = clock()
    for th in threads:
        th.join()
    wall = clock() - start
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu1 = tree_cpu_seconds(server_pid)
    client_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    flat = [x for lst in latencies for x in lst]
    run = LoadRun(len(paths) / wall, flat, sum(errors), wall, cpu1 - cpu0, client_cpu)
    return run, sum(mismatches)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Process:
    """A server started in its own process group, stopped by PID."""

    def __init__(self, name: str, cmd: list[str], log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_path
        self.handle = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.handle,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     env=env, cwd=REPO)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, port: int, probe: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SetupError(f"{self.name} exited with {self.proc.returncode}:\n"
                                 f"{self.log_tail()}")
            conn = Conn(port)
            try:
                status, _ = conn.get(probe)
                if status in (200, 404):
                    return
            except (OSError, EOFError, ValueError):
                pass
            finally:
                conn.close()
            time.sleep(0.2)
        raise SetupError(f"{self.name} not answering on port {port} after {timeout} s:\n"
                         f"{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, term_pid_only: bool = False) -> None:
        """SIGTERM (to the PID, or to its process group), SIGKILL the group after 15 s."""
        if self.proc.poll() is None:
            try:
                if term_pid_only:
                    os.kill(self.proc.pid, signal.SIGTERM)
                else:
                    os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop in 15 s; killing its process group")
        try:  # whatever is left of its process group (e.g. gunicorn workers)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(5)
        self.handle.close()


def nginx_config(work: Path, port: int, root: Path) -> Path:
    tmp = work / "nginx"
    tmp.mkdir(exist_ok=True)
    conf = tmp / "nginx.conf"
    temp_paths = "\n".join(f"    {name}_temp_path {tmp / name};"
                           for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf.write_text(f"""\
# Written by bench/render/run.py: static answer files, as a pre-generating tool serves them.
daemon off;
worker_processes 2;
pid {tmp / 'nginx.pid'};
error_log {tmp / 'error.log'} warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 100000;
    keepalive_timeout 60s;
    default_type text/plain;
{temp_paths}
    server {{
        listen {HOST}:{port};
        root {root};
        location /install/ {{ }}
    }}
}}
""")
    return conf


@dataclass
class HttpResult:
    server: str
    clients: int
    runs: list[LoadRun]

    @property
    def rate(self) -> float:
        return statistics.median(r.rate for r in self.runs)

    def pct(self, q: float) -> float:
        flat = sorted(x for r in self.runs for x in r.latencies)
        if not flat:
            return float("nan")
        return flat[min(len(flat) - 1, int(q * len(flat)))] * 1000

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.runs)

    def per_request(self, attr: str) -> float:
        n = sum(len(r.latencies) + r.errors for r in self.runs)
        return sum(getattr(r, attr) for r in self.runs) / max(1, n) * 1000

    @property
    def client_share(self) -> float:
        """Client CPU as a share of one core over the runs' wall time."""
        return sum(r.client_cpu for r in self.runs) / sum(r.wall for r in self.runs)

    @property
    def server_share(self) -> float:
        return sum(r.server_cpu for r in self.runs) / sum(r.wall for r in self.runs)


def over_http(args: argparse.Namespace, work: Path, config: Config, db: Database,
              catalog: Catalog, targets: list[Target], watch: OpenWatch,
              app_port: int) -> tuple[list[HttpResult], list[str]]:
    notes: list[str] = []
    base_url = f"http://{HOST}:{app_port}"
    # Cobbler-style pre-generation: the same files, rendered once, written out.
    static = work / "static"
    target = BootTarget(base_url, HOST)
    expect: dict[str, bytes] = {}
    with db.session() as s:
        for t in targets:
            machine = machine_by_install_token(s, t.token)
            assert machine is not None
            body = render_machine_file(config, s, catalog, machine, t.file, target).encode()
            path = static / t.path.lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body)
            expect[t.path] = body
    for d in (work, *static.rglob("*")):
        d.chmod(0o755 if d.is_dir() else 0o644)  # nginx workers run as nobody
    sizes = [len(b) for b in expect.values()]
    notes.append(f"answer files: {len(sizes)}, {min(sizes):,}-{max(sizes):,} bytes "
                 f"(mean {statistics.mean(sizes):,.0f})")
    db.dispose()  # the appliance process gets the database to itself

    nginx_port = free_port()
    conf = nginx_config(work, nginx_port, static)
    app_conf = work / "appliance.toml"
    app_conf.write_text(f"""\
state_dir = "{config.state_dir}"
log_level = "WARNING"
[http]
bind = "{HOST}"
port = {app_port}
{f"workers = {args.workers}" if args.workers else ""}
[boot]
bootenvs_dir = "{config.boot.bootenvs_dir}"
templates_dir = "{config.boot.templates_dir}"
""")
    paths = [t.path for t in targets]
    servers: dict[str, Process] = {}
    results: dict[tuple[str, int], HttpResult] = {}
    try:
        log(f"http: starting appliance serve --only http on {HOST}:{app_port}")
        env = dict(os.environ, PYTHONPATH=str(REPO))
        servers["appliance"] = Process(
            "appliance", [sys.executable, "-m", "appliance.cli", "--config", str(app_conf),
                          "serve", "--only", "http"], work / "appliance.log", env=env)
        log(f"http: starting nginx on {HOST}:{nginx_port}")
        servers["nginx"] = Process(
            "nginx", ["nginx", "-e", str(work / "nginx" / "error.log"), "-p",
                      str(work / "nginx"), "-c", str(conf)], work / "nginx.log")
        servers["appliance"].wait_ready(app_port, paths[0])
        servers["nginx"].wait_ready(nginx_port, paths[0])
        ports = {"appliance": app_port, "nginx": nginx_port}
        events_before = count_events(config)
        warm_requests = 0
        # Warm-up: every file from both servers, bodies compared with the static files;
        # twice for the appliance so both gunicorn workers have served by the end.
        for name in ("appliance", "nginx"):
            for _ in range(2 if name == "appliance" else 1):
                run, bad = fetch_all(ports[name], paths, 8, servers[name].pid, expect)
                warm_requests += len(paths) if name == "appliance" else 0
                notes.append(f"warm-up {name}: {len(paths)} requests, {run.errors} errors, "
                             f"{bad} bodies differing from the pre-rendered files")
        startup_opens = watch.drain()
        measured = 0
        for level in args.clients:
            for rep in range(args.http_passes):
                for name in ("appliance", "nginx"):
                    log(f"http: {name}, {level} clients, pass {rep + 1}/{args.http_passes}")
                    repeat = args.nginx_repeat if name == "nginx" else 1
                    run, _ = fetch_all(ports[name], paths * repeat, level, servers[name].pid)
                    results.setdefault((name, level), HttpResult(name, level, [])).runs.append(
                        run)
                    measured += len(paths) if name == "appliance" else 0
        opens = watch.drain()
        events_after = count_events(config)
        notes.append(f"template/bootenv file opens (inotify): {startup_opens} during "
                     f"appliance start-up and warm-up, {opens} during the {measured:,} "
                     f"measured appliance requests")
        notes.append(f"event rows written during the HTTP phase: "
                     f"{events_after - events_before:,} for {warm_requests + measured:,} "
                     f"answer requests")
    finally:
        for name, proc in servers.items():
            proc.stop(term_pid_only=name == "appliance")
    return list(results.values()), notes


def count_events(config: Config) -> int:
    db = Database(config.effective_database_url)
    try:
        with db.session() as s:
            return s.scalar(select(func.count()).select_from(Event)) or 0
    finally:
        db.dispose()


# --------------------------------------------------------------------------- report


def fingerprint(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
    return digest.hexdigest()[:12]


def git_head() -> str:
    res = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--",
                            "appliance", "bootenvs", "templates"],
                           capture_output=True, text=True).stdout.strip()
    return (res.stdout.strip() or "?") + (" + uncommitted changes" if dirty else "")


def nginx_version() -> str:
    res = subprocess.run(["nginx", "-v"], capture_output=True, text=True)
    return res.stderr.strip().removeprefix("nginx version: ")


def print_in_process(timings: list[Timing], split: dict[str, float], passes: int) -> None:
    files = list(ANSWER_FILES.values())
    print(f"\nIn-process, single thread: renders/s median of {passes} passes (rows "
          f"interleaved), after a warm-up")
    head = (f"{'what':<58} {'renders/s':>10} {'us/file':>8} "
            + " ".join(f"{f + '/s':>13}" for f in files)
            + f" {'reads':>6} {'parses':>6} {'compiles':>8} {'opens':>6}")
    print(head)
    print("-" * len(head))
    for t in timings:
        rate = statistics.median(t.overall)
        per = " ".join(f"{statistics.median(t.per_file[f]):>13,.0f}" for f in files)
        reads, parses, compiles = t.counts
        print(f"{t.label:<58} {rate:>10,.0f} {1e6 / rate:>8,.0f} {per} {reads:>6} {parses:>6}"
              f" {compiles:>8} {t.opens:>6}")
    print("-" * len(head))
    full = statistics.median(timings[0].overall)
    fresh = statistics.median(timings[-1].overall)
    total = sum(split.values())
    print("split of the staged row, us per file (share): " + ", ".join(
        f"{name} {us:,.0f} ({us / total:.0%})" for name, us in split.items()))
    print(f"cached environment / fresh environment per request: {full / fresh:.1f}x")
    print("reads/parses/compiles: calls of FileSystemLoader.get_source, Environment._parse, "
          "Environment.compile\nduring the measured passes; opens: template and bootenv "
          "file opens seen by inotify.")


def print_http(results: list[HttpResult], clients: list[int], passes: int,
               repeat: int) -> None:
    print(f"\nOver HTTP, loopback, keep-alive clients; a pass fetches every answer file once "
          f"(nginx: {repeat} times);\nreq/s: median of {passes} passes; latency over all "
          f"passes")
    head = (f"{'server':<10} {'clients':>7} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
            f"{'errors':>6} {'srv CPU':>8} {'srv ms/req':>10} {'cli CPU':>8} "
            f"{'cli ms/req':>10}")
    print(head)
    print("-" * len(head))
    by = {(r.server, r.clients): r for r in results}
    for level in clients:
        for name in ("appliance", "nginx"):
            r = by.get((name, level))
            if r is None:
                continue
            print(f"{name:<10} {level:>7} {r.rate:>8,.0f} {r.pct(0.50):>7.2f} "
                  f"{r.pct(0.99):>7.2f} {r.errors:>6} {r.server_share:>7.0%} "
                  f"{r.per_request('server_cpu'):>10.3f} {r.client_share:>7.0%} "
                  f"{r.per_request('client_cpu'):>10.3f}")
    print("-" * len(head))
    for level in clients:
        a, n = by.get(("appliance", level)), by.get(("nginx", level))
        if a and n:
            print(f"appliance/nginx at {level} clients: {a.rate / n.rate:.3f} "
                  f"({a.rate:,.0f} vs {n.rate:,.0f} req/s)")
    print("srv/cli CPU: CPU time of the server's process tree / of the client threads, as a "
          "share of one core\nover the passes' wall time (2 cores = 200%).")


# --------------------------------------------------------------------------- main


def prepare_tree(work: Path) -> tuple[Path, Path]:
    """A private copy of the shipped bootenvs/ and templates/ (watched by inotify)."""
    bootenvs = work / "bootenvs"
    templates = work / "templates"
    shutil.copytree(shipped_dir("bootenvs"), bootenvs)
    shutil.copytree(shipped_dir("templates"), templates)
    return bootenvs, templates


def main() -> int:  # noqa: C901 - a linear script
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--machines", type=int, default=1000)
    parser.add_argument("--passes", type=int, default=3,
                        help="in-process passes over all machines (median reported)")
    parser.add_argument("--fresh", type=int, default=100,
                        help="machines in the fresh-environment and Flask-endpoint rows")
    parser.add_argument("--clients", default="8,32",
                        help="concurrent HTTP clients, comma separated")
    parser.add_argument("--http-passes", type=int, default=3,
                        help="passes over all answer files per server and client count")
    parser.add_argument("--nginx-repeat", type=int, default=10,
                        help="nginx passes fetch every file this many times (its passes "
                             "are otherwise too short to time)")
    parser.add_argument("--workers", type=int, default=0,
                        help="appliance http.workers (default: the appliance's default)")
    parser.add_argument("--no-http", action="store_true", help="in-process figures only")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",") if c.strip()]
    if args.machines < 2 or args.passes < 1 or not args.clients:
        parser.error("need --machines >= 2, --passes >= 1 and at least one client count")
    if not args.no_http and shutil.which("nginx") is None:
        log("nginx not found: apt-get install nginx (or run with --no-http)")
        return 2

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    load_before = os.getloadavg()
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bench-render-"))
    watch: OpenWatch | None = None
    try:
        bootenvs_dir, templates_dir = prepare_tree(work)
        config = Config(state_dir=str(work / "state"), log_level="WARNING")
        config.boot.bootenvs_dir = str(bootenvs_dir)
        config.boot.templates_dir = str(templates_dir)
        config.http.bind = HOST
        app_port = free_port()
        base_url = f"http://{HOST}:{app_port}"
        db = Database(config.effective_database_url)
        db.migrate()
        t0 = time.perf_counter()
        catalog = load_catalog(config)
        load_ms = (time.perf_counter() - t0) * 1000
        missing = [n for n in ANSWER_FILES if n not in catalog.bootenvs]
        if missing:
            for error in catalog.errors:
                log(f"catalog: {error}")
            raise SetupError(f"bootenv(s) {', '.join(missing)} not loadable from "
                             f"{shipped_dir('bootenvs')}")
        used = [templates_dir / catalog.bootenvs[n].templates[f]
                for n, f in ANSWER_FILES.items()]
        log(f"setup: {args.machines} machines in {work}")
        t0 = time.perf_counter()
        targets, keys = populate(db, catalog, args.machines)
        setup_s = time.perf_counter() - t0
        checks = check_params(config, db, catalog, targets, keys, base_url)
        watch = OpenWatch([bootenvs_dir, templates_dir,
                           *[d for d in templates_dir.rglob("*") if d.is_dir()]])
        timings, split = in_process(config, db, catalog, targets, args.passes, args.fresh, watch,
                             base_url)
        http_results: list[HttpResult] = []
        http_notes: list[str] = []
        if not args.no_http:
            http_results, http_notes = over_http(args, work, config, db, catalog, targets,
                                                 watch, app_port)
        load_after = os.getloadavg()

        n_by_env = {n: sum(1 for t in targets if t.bootenv == n) for n in ANSWER_FILES}
        print("bench/render: answer-file rendering, kickstart (rocky-9) and preseed "
              "(debian-12)")
        print(f"  appliance: git {git_head()}; templates used sha256 {fingerprint(used)} "
              f"({', '.join(str(p.relative_to(templates_dir)) for p in used)})")
        print(f"  Python {sys.version.split()[0]}, Jinja2 {jinja2.__version__}, "
              f"nginx {nginx_version() if not args.no_http else '-'}, "
              f"{os.cpu_count()} CPUs, load average {load_before[0]:.2f} before / "
              f"{load_after[0]:.2f} after (1 min)")
        print(f"  {args.machines:,} machines ({', '.join(f'{v} {k}' for k, v in n_by_env.items())}"
              f"), each: global < site-fra1 < rack-rNN < role-* < own params "
              f"(hostname, asset_tag, a third root_disk); bound lease each;")
        print(f"  state: embedded SQLite (WAL) in {work} ({fs_type(work)}); setup "
              f"{setup_s:.1f} s; load_catalog {load_ms:.0f} ms (once per process)")
        for line in checks:
            print(line)
        print_in_process(timings, split, args.passes)
        if http_results:
            print_http(http_results, args.clients, args.http_passes, args.nginx_repeat)
            for note in http_notes:
                print(f"  {note}")
        print(f"\ntotal {time.monotonic() - started:.0f} s")
        return 0
    except SetupError as exc:
        log(f"setup failed: {exc}")
        return 2
    except KeyboardInterrupt:
        log("interrupted")
        return 2
    finally:
        if watch is not None:
            watch.close()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def fs_type(path: Path) -> str:
    res = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    return res.stdout.strip() or "?"


if __name__ == "__main__":
    sys.exit(main())
