"""HTTP requests counted by endpoint group and status class, per gunicorn worker.

The HTTP part serves kernels and initrds, so counting must cost next to nothing: the
``after_request`` hook does one dict increment under an uncontended lock, never a
database write. Each worker publishes its totals to the ``counters`` table as part
``http-<pid>`` (counter names ``<group>_<class>``, e.g. ``boot_2xx``) from a background
thread every ``PUBLISH_EVERY`` seconds, and once more when the worker exits. The thread
is started by gunicorn's ``post_worker_init`` hook (``web/server.py``), so it exists only
in a worker, after the fork; an app made by ``create_app`` alone (tests) counts but
publishes only when asked.

Stale rows: a worker that dies leaves its row, so the sum over ``http-*`` rows (what
``/metrics`` reports) never goes down while the HTTP part runs. The HTTP part deletes all
``http-*`` rows when it starts (``forget_workers``), which a scraper sees as a counter
reset, as it does when any other part restarts. A new worker that gets the PID of a dead
one adds to that row instead of overwriting it.
"""

from __future__ import annotations

import logging
import os
import threading

from flask import Flask, request
from flask.wrappers import Response
from sqlalchemy import delete, select

from appliance.db import Database, publish_counters
from appliance.models import Counter

log = logging.getLogger("appliance.http")

#: Part name prefix of the rows the HTTP workers publish.
PART_PREFIX = "http-"
PUBLISH_EVERY = 5.0
EXTENSION = "appliance_request_counts"

#: Endpoint groups, in the order /metrics lists them.
GROUPS = ("boot", "images", "install", "metadata", "api", "ui", "metrics", "other")
#: Status classes /metrics always lists (others appear once they happen).
CODE_CLASSES = ("2xx", "3xx", "4xx", "5xx")
#: Group of each blueprint's endpoints ...
BLUEPRINT_GROUPS = {"boot": "boot", "install": "install", "metadata": "metadata",
                    "api": "api", "ui": "ui", "metrics": "metrics"}
#: ... except these: file downloads (kernels, initrds, boot loaders over HTTP) are
#: ``images``; the health check and requests that matched no route are ``other``.
ENDPOINT_GROUPS = {"boot.images": "images", "boot.tftp_root_over_http": "images",
                   "boot.healthz": "other", "static": "ui"}


def endpoint_group(endpoint: str | None) -> str:
    if endpoint is None:
        return "other"
    group = ENDPOINT_GROUPS.get(endpoint)
    if group is None:
        blueprint, dot, _ = endpoint.partition(".")
        group = BLUEPRINT_GROUPS.get(blueprint, "other") if dot else "other"
    return group


def counter_name(group: str, status: int) -> str:
    return f"{group}_{status // 100}xx"


def split_counter_name(name: str) -> tuple[str, str] | None:
    """``boot_2xx`` -> ``("boot", "2xx")``; None for a name not made by counter_name."""
    group, sep, code_class = name.rpartition("_")
    if not sep or not group or len(code_class) != 3 or not code_class.endswith("xx") \
            or not code_class[0].isdigit():
        return None
    return group, code_class


def part_name() -> str:
    return f"{PART_PREFIX}{os.getpid()}"


class RequestCounts:
    """This process's request totals; ``count`` is the per-request hot path."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._names: dict[tuple[str | None, int], str] = {}
        #: What the row held before this process first published (a dead worker with
        #: the same PID); None until the first publish.
        self._base: dict[str, int] | None = None
        self._published: dict[str, int] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def count(self, endpoint: str | None, status: int) -> None:
        key = (endpoint, status)
        name = self._names.get(key)
        if name is None:  # once per endpoint and status; the dict stays small
            name = self._names[key] = counter_name(endpoint_group(endpoint), status)
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def publish(self, db: Database) -> None:
        """Write this process's totals as part ``http-<pid>`` if they changed."""
        part = part_name()
        if self._base is None:
            with db.session() as session:
                self._base = {name: value for name, value in session.execute(
                    select(Counter.name, Counter.value).where(Counter.part == part))}
        values = dict(self._base)
        for name, n in self.snapshot().items():
            values[name] = values.get(name, 0) + n
        if values == self._published:
            return
        publish_counters(db, part, values)
        self._published = values

    def _publish_logged(self, db: Database) -> None:
        try:
            self.publish(db)
        except Exception as exc:  # noqa: BLE001 - the database may be briefly unavailable
            log.warning("could not publish HTTP request counters: %s", exc)

    def start_publisher(self, db: Database, every: float = PUBLISH_EVERY) -> None:
        """Publish every ``every`` seconds from a daemon thread (call after any fork)."""
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.wait(every):
                self._publish_logged(db)

        self._thread = threading.Thread(target=loop, name="http-counters", daemon=True)
        self._thread.start()

    def stop_publisher(self, db: Database) -> None:
        """Stop the thread and publish a last time."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        self._publish_logged(db)


def install(app: Flask) -> RequestCounts:
    """Count every response of ``app`` (errors included) in a new RequestCounts."""
    counts = RequestCounts()
    app.extensions[EXTENSION] = counts

    @app.after_request
    def _count_request(response: Response) -> Response:
        counts.count(request.endpoint, response.status_code)
        return response

    return counts


def _app_parts(app: Flask | None) -> tuple[RequestCounts, Database] | None:
    if app is None or EXTENSION not in getattr(app, "extensions", {}):
        return None
    return app.extensions[EXTENSION], app.extensions["appliance"].db


def start_in_worker(app: Flask | None) -> None:
    """gunicorn ``post_worker_init``: start publishing this worker's counts."""
    parts = _app_parts(app)
    if parts is not None:
        parts[0].start_publisher(parts[1])


def stop_in_worker(app: Flask | None) -> None:
    """gunicorn ``worker_exit``: publish this worker's last counts."""
    parts = _app_parts(app)
    if parts is not None:
        parts[0].stop_publisher(parts[1])


def workers_summed(counters: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """``counters`` (as read_counters gives them) with the ``http-<pid>`` rows added up
    into one part ``http``: what an operator asks for, not one row per worker."""
    merged: dict[str, dict[str, int]] = {}
    for part, values in counters.items():
        target = merged.setdefault("http" if part.startswith(PART_PREFIX) else part, {})
        for name, value in values.items():
            target[name] = target.get(name, 0) + value
    return merged


def forget_workers(db: Database) -> int:
    """Delete every ``http-*`` row (the HTTP part calls this as it starts)."""
    with db.session() as session:
        result = session.execute(
            delete(Counter).where(Counter.part.like(f"{PART_PREFIX}%")))
        return int(result.rowcount or 0)  # type: ignore[attr-defined]
