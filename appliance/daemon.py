"""``appliance serve``: one supervisor running DHCP, TFTP and HTTP side by side.

Each part is its own child process (``appliance run-part NAME``), started fresh rather
than forked from this one, so no sockets, threads or database connections leak between
parts, and gunicorn's forking only ever sees the HTTP part. A part that dies is logged
and restarted with a growing delay; SIGTERM or SIGINT stops every part and then exits.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from appliance.config import Config

log = logging.getLogger("appliance.daemon")

PARTS = ("dhcp", "tftp", "http", "syslog", "power", "lifecycle")
#: Restart delays grow from MIN to MAX; a part that stayed up STABLE seconds starts over.
RESTART_DELAY_MIN = 1.0
RESTART_DELAY_MAX = 30.0
STABLE_SECONDS = 60.0
STOP_GRACE_SECONDS = 10.0


@dataclass
class Part:
    name: str
    command: list[str]
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restart_at: float = 0.0
    delay: float = RESTART_DELAY_MIN
    restarts: int = field(default=0)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL)
        self.started_at = time.monotonic()
        log.info("part %s started (pid %d)", self.name, self.proc.pid)


def enabled_parts(config: Config, only: list[str] | None) -> list[str]:
    wanted = only or [p for p in PARTS if getattr(config, p).enabled]
    unknown = [p for p in wanted if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown part(s): {', '.join(unknown)} (parts: {', '.join(PARTS)})")
    return wanted


def part_command(name: str, config_path: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "appliance.cli"]
    if config_path:
        cmd += ["--config", config_path]
    return [*cmd, "run-part", name]


class Supervisor:
    def __init__(self, parts: list[Part]) -> None:
        self.parts = parts
        self.stopping = False

    def _on_signal(self, signum: int, _frame: object) -> None:
        if not self.stopping:
            log.info("received %s, stopping", signal.Signals(signum).name)
        self.stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for part in self.parts:
            part.start()
        while not self.stopping:
            self._check_parts()
            time.sleep(0.2)
        self._stop_all()
        return 0

    def _check_parts(self) -> None:
        now = time.monotonic()
        for part in self.parts:
            if part.proc is None:
                if now >= part.restart_at:
                    part.restarts += 1
                    log.info("restarting part %s (restart #%d)", part.name, part.restarts)
                    part.start()
                continue
            code = part.proc.poll()
            if code is None:
                continue
            uptime = now - part.started_at
            if uptime >= STABLE_SECONDS:
                part.delay = RESTART_DELAY_MIN
            log.error("part %s (pid %d) exited with status %s after %.1f s; restarting in "
                      "%.0f s", part.name, part.proc.pid, code, uptime, part.delay)
            part.proc = None
            part.restart_at = now + part.delay
            part.delay = min(part.delay * 2, RESTART_DELAY_MAX)

    def _stop_all(self) -> None:
        running = [p for p in self.parts if p.proc is not None and p.proc.poll() is None]
        for part in running:
            assert part.proc is not None
            part.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for part in running:
            assert part.proc is not None
            try:
                part.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("part %s did not stop in %.0f s; killing it", part.name,
                            STOP_GRACE_SECONDS)
                part.proc.kill()
                part.proc.wait()
            log.info("part %s stopped", part.name)


def serve(config: Config, config_path: str | None, only: list[str] | None = None) -> int:
    """Migrate the database, then supervise the parts until a signal arrives."""
    from appliance.db import Database

    names = enabled_parts(config, only)
    if not names:
        log.error("no part is enabled (every part is disabled in the configuration)")
        return 2
    db = Database(config.effective_database_url)
    db.migrate()
    db.dispose()
    log.info("appliance starting: parts %s, database %s", ", ".join(names),
             _redact(config.effective_database_url))
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    parts = [Part(n, part_command(n, config_path)) for n in names]
    return Supervisor(parts).run()


def _redact(url: str) -> str:
    """Hide a password in a database URL for logging."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def run_part(name: str, config: Config) -> int:
    """Run one part in this process (the supervisor's children call this)."""
    from appliance.db import Database

    if name == "http":
        from appliance.web.server import run as run_http

        return run_http(config) or 0
    db = Database(config.effective_database_url)
    if name == "dhcp":
        from appliance.dhcp.server import run as run_dhcp

        run_dhcp(config, db)
    elif name == "tftp":
        from appliance.tftp.server import run as run_tftp

        run_tftp(config, db)
    elif name == "syslog":
        from appliance.syslog.server import run as run_syslog

        run_syslog(config, db)
    elif name == "power":
        from appliance.power.worker import run as run_power

        run_power(config, db)
    elif name == "lifecycle":
        from appliance.lifecycle.worker import run as run_lifecycle

        run_lifecycle(config, db)
    else:
        raise ValueError(f"unknown part {name!r}")
    return 0
