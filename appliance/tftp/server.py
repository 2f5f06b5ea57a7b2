"""The TFTP part: ``run(config, db, stop)`` serves read-only TFTP until told to stop.

With ``tftp.workers == 1`` the engine runs in the calling thread. Otherwise (default:
one per CPU) ``run`` starts that many worker processes (``python -m
appliance.tftp.worker``, fresh interpreters, never forks of this one), each with its
own socket on the port (SO_REUSEPORT: the kernel spreads clients over the workers by
address and port, and a client's retransmitted request reaches the same worker). A
worker that dies is logged and restarted. Either way the counters are summed and
written with ``publish_counters(db, "tftp", ...)`` every ``PUBLISH_EVERY`` seconds, from
a separate thread so a slow database never stalls a transfer, and once more at exit.

Stops on SIGTERM/SIGINT (handlers are installed only when called in the main thread)
or when ``stop`` is set.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import selectors
import subprocess
import sys
import threading
import time

from appliance.config import Config
from appliance.db import Database, publish_counters
from appliance.stopsignals import stop_on_signals
from appliance.tftp.engine import Engine, new_counters, worker_count
from appliance.tftp.transfer_events import PENDING_KEPT, TRANSFERS_KEY, TransferEvents

log = logging.getLogger("appliance.tftp")

PUBLISH_EVERY = 5.0
WORKER_STOP_GRACE = 5.0


class _Publisher(threading.Thread):
    """Publishes ``snapshot()`` every PUBLISH_EVERY seconds until ``done`` is set, and
    writes the ended transfers (``take_transfers()``) of machines being provisioned as
    timeline events."""

    def __init__(self, db: Database, snapshot, done: threading.Event,  # type: ignore[no-untyped-def]
                 take_transfers) -> None:  # type: ignore[no-untyped-def]
        super().__init__(name="tftp-counters", daemon=True)
        self.db = db
        self.snapshot = snapshot
        self.done = done
        self.last: dict[str, int] | None = None
        self.take_transfers = take_transfers
        self.events = TransferEvents(db)

    def publish(self) -> None:
        self.events.add(self.take_transfers())
        self.events.write()
        values = self.snapshot()
        if values == self.last:
            return
        try:
            publish_counters(self.db, "tftp", values)
            self.last = values
        except Exception as exc:                 # the database may be briefly unavailable
            log.warning("could not publish TFTP counters: %s", exc)

    def run(self) -> None:
        while not self.done.wait(PUBLISH_EVERY):
            self.publish()


def run(config: Config, db: Database, stop: threading.Event | None = None) -> None:
    """Serve TFTP (read-only) from ``config.tftp.root`` until a signal or ``stop``."""
    logging.getLogger("tftpy").setLevel(logging.WARNING)   # tftpy logs every packet
    stop = stop if stop is not None else threading.Event()
    cfg = config.tftp
    if not os.path.isdir(cfg.root):
        log.error("TFTP root %s is not a directory; serving nothing but errors", cfg.root)
    with stop_on_signals(stop, "TFTP", log):
        n = worker_count(cfg)
        if n == 1:
            _run_in_process(config, db, stop)
        else:
            _run_workers(config, db, stop, n)


def _run_in_process(config: Config, db: Database, stop: threading.Event) -> None:
    engine = Engine(config.tftp)
    bound = engine.open()
    log.info("TFTP serving %s on %s:%d (read-only, 1 process)", config.tftp.root, *bound)
    done = threading.Event()
    publisher = _Publisher(db, lambda: dict(engine.counters), done, engine.take_finished)
    publisher.start()
    try:
        engine.serve(stop.is_set)
    finally:
        engine.close()
        done.set()
        publisher.join(5)
        publisher.publish()
        log.info("TFTP stopped: %s", _summary(engine.counters))


@dataclasses.dataclass
class _Worker:
    index: int
    proc: subprocess.Popen | None = None
    counters: dict[str, int] = dataclasses.field(default_factory=new_counters)
    buf: bytes = b""
    restart_at: float = 0.0
    started_at: float = 0.0


class _WorkerPool:
    def __init__(self, config: Config, n: int) -> None:
        self.config = config
        self.workers = [_Worker(i) for i in range(n)]
        self.retired = new_counters()          # totals of workers that died and restarted
        self.sel = selectors.DefaultSelector()
        self.lock = threading.Lock()
        self.transfers: list[dict] = []        # ended transfers reported by the workers

    def spec(self, index: int) -> bytes:
        return (json.dumps({"tftp": dataclasses.asdict(self.config.tftp),
                            "log_level": self.config.log_level, "index": index}) + "\n").encode()

    def start(self, w: _Worker) -> None:
        env = dict(os.environ)
        pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"]
                                          if env.get("PYTHONPATH") else "")
        w.proc = subprocess.Popen([sys.executable, "-m", "appliance.tftp.worker"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        assert w.proc.stdin is not None and w.proc.stdout is not None
        w.proc.stdin.write(self.spec(w.index))
        w.proc.stdin.flush()
        os.set_blocking(w.proc.stdout.fileno(), False)
        self.sel.register(w.proc.stdout, selectors.EVENT_READ, w)
        w.started_at = time.monotonic()
        w.buf = b""
        log.debug("TFTP worker %d started (pid %d)", w.index, w.proc.pid)

    def read(self, w: _Worker) -> bool:
        """Read the worker's counter lines; False at EOF."""
        assert w.proc is not None and w.proc.stdout is not None
        try:
            chunk = os.read(w.proc.stdout.fileno(), 65536)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        w.buf += chunk
        *lines, w.buf = w.buf.split(b"\n")
        for line in lines:
            try:
                values = json.loads(line)
            except ValueError:
                continue
            if not isinstance(values, dict):
                continue
            ended = values.pop(TRANSFERS_KEY, None)
            with self.lock:
                w.counters = {k: int(values.get(k, 0)) for k in w.counters}
                if isinstance(ended, list) and len(self.transfers) < PENDING_KEPT:
                    self.transfers.extend(ended)
        return True

    def take_transfers(self) -> list[dict]:
        with self.lock:
            taken, self.transfers = self.transfers, []
        return taken

    def reap(self, w: _Worker) -> int | None:
        assert w.proc is not None and w.proc.stdout is not None
        self.sel.unregister(w.proc.stdout)
        w.proc.stdout.close()
        if w.proc.stdin is not None:
            try:
                w.proc.stdin.close()
            except OSError:
                pass
        try:
            code = w.proc.wait(WORKER_STOP_GRACE)
        except subprocess.TimeoutExpired:
            log.warning("TFTP worker %d (pid %d) did not stop; killing it", w.index, w.proc.pid)
            w.proc.kill()
            code = w.proc.wait()
        w.proc = None
        with self.lock:
            for k, v in w.counters.items():
                self.retired[k] += v
            w.counters = new_counters()
        return code

    def totals(self) -> dict[str, int]:
        with self.lock:
            out = dict(self.retired)
            for w in self.workers:
                for k, v in w.counters.items():
                    out[k] += v
        return out


def _run_workers(config: Config, db: Database, stop: threading.Event, n: int) -> None:
    cfg = config.tftp
    pool = _WorkerPool(config, n)
    for w in pool.workers:
        pool.start(w)
    log.info("TFTP serving %s on %s:%d (read-only, %d worker processes, pids %s)", cfg.root,
             cfg.bind, cfg.port, n, ", ".join(str(w.proc.pid) for w in pool.workers if w.proc))
    done = threading.Event()
    publisher = _Publisher(db, pool.totals, done, pool.take_transfers)
    publisher.start()
    delay = 1.0
    try:
        while not stop.is_set():
            for key, _ in pool.sel.select(0.2):
                w = key.data
                if not pool.read(w):
                    code = pool.reap(w)
                    if stop.is_set():
                        continue
                    up = time.monotonic() - w.started_at
                    delay = 1.0 if up > 60 else min(delay * 2, 30.0)
                    log.error("TFTP worker %d exited with status %s after %.1f s; restarting "
                              "in %.0f s", w.index, code, up, delay)
                    w.restart_at = time.monotonic() + delay
            now = time.monotonic()
            for w in pool.workers:
                if w.proc is None and not stop.is_set() and now >= w.restart_at:
                    pool.start(w)
    finally:
        # Closing a worker's stdin tells it to stop; then drain its last counters.
        for w in pool.workers:
            if w.proc is not None and w.proc.stdin is not None:
                try:
                    w.proc.stdin.close()
                except OSError:
                    pass
        deadline = time.monotonic() + WORKER_STOP_GRACE
        while any(w.proc is not None for w in pool.workers) and time.monotonic() < deadline:
            for key, _ in pool.sel.select(0.1):
                w = key.data
                if not pool.read(w):
                    pool.reap(w)
        for w in pool.workers:
            if w.proc is not None:
                pool.reap(w)
        pool.sel.close()
        done.set()
        publisher.join(5)
        publisher.publish()
        log.info("TFTP stopped: %s", _summary(pool.totals()))


def _summary(c: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in c.items())
