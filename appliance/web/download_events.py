"""Boot file downloads of machines being provisioned, as ``download`` events for their
timeline: the kernel and initrds of their bootenv, other files under ``/images`` (an
installer's stage2, a deploy's OS image) and boot loaders over HTTP (UEFI HTTP boot).

Only downloads that start at the first byte count (a client reading a file in ranges is
one download, not one per range). The event is written when the server closes the
body, so it carries the time the download took; the address is matched to a machine
through its lease (:mod:`appliance.watchlist`, read every few seconds per worker).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from flask import Response, request

from appliance.lifecycle import record_event
from appliance.models import Machine, utcnow
from appliance.timeline import DOWNLOAD, FILE, INITRD, KERNEL, LOADER
from appliance.watchlist import AddressWatch
from appliance.web import state

log = logging.getLogger("appliance.http")

_watch_lock = threading.Lock()
_watches: dict[int, AddressWatch] = {}


def _watch() -> AddressWatch:
    st = state()
    key = id(st)
    with _watch_lock:
        watch = _watches.get(key)
        if watch is None:
            watch = _watches[key] = AddressWatch(st.db.session)
        return watch


def role_of(bootenv_name: str, relative: str) -> str:
    bootenv = state().catalog.bootenvs.get(bootenv_name)
    if bootenv is not None:
        for boot in bootenv.firmware.values():
            if relative == boot.kernel:
                return KERNEL
            if relative in boot.initrds:
                return INITRD
    return FILE


def watcher(relative: str, loader: bool = False) -> Callable[[Response], Callable[[], None] | None]:
    """For ``send_path(on_body_closed=...)``: a callback writing the download event when
    the client is a machine being provisioned, else None (nothing to do)."""

    def decide(response: Response) -> Callable[[], None] | None:
        if response.status_code not in (200, 206):
            return None
        if response.status_code == 206 and not str(
                response.headers.get("Content-Range", "")).startswith("bytes 0-"):
            return None
        client = request.remote_addr
        watched = _watch().lookup(client)
        if watched is None:
            return None
        st = state()
        role = LOADER if loader else role_of(watched.bootenv, relative)
        size = response.content_length or 0
        started, started_wall = time.monotonic(), utcnow()

        def record() -> None:
            took = time.monotonic() - started
            try:
                with st.db.session() as session:
                    machine = session.get(Machine, watched.machine_id)
                    if machine is not None:
                        record_event(
                            session, machine, "http", DOWNLOAD,
                            f"{role} {relative} ({size / 1048576:.1f} MiB) in {took:.1f} s",
                            {"path": relative, "role": role, "bytes": size,
                             "seconds": round(took, 3), "client": client,
                             "started": started_wall.isoformat()})
            except Exception as exc:  # noqa: BLE001 - never fail the response's close
                log.warning("could not record the download of %s by %s: %s", relative,
                            client, exc)

        return record

    return decide
