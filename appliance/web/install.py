"""Endpoints an installing machine uses: its answer files, log upload, install finished.

Every URL carries the machine's one-time install token (from its kernel command line),
never a guessable id. An unknown token gets 404 (and an event, at most one per client
per minute: ``appliance/web/unknown.py``), never another machine's data. The token stops
working when the install reports done.
"""

from __future__ import annotations

import json
import logging

from flask import Blueprint, Response, request
from sqlalchemy import update
from sqlalchemy.orm import Session

from appliance.installlogs import LogLine, record_install_lines, trim_install_logs
from appliance.lifecycle import record_event
from appliance.lifecycle.operations import install_done as lifecycle_install_done
from appliance.machinefiles import machine_by_install_token, render_machine_file
from appliance.models import Machine
from appliance.render import RenderError
from appliance.web import state
from appliance.web.boot import current_target
from appliance.web.unknown import unknown_request

log = logging.getLogger("appliance.http")

install = Blueprint("install", __name__)

#: Largest log upload accepted in one request (also the app's MAX_CONTENT_LENGTH).
MAX_LOG_BYTES = 8 * 1024 * 1024
#: Most lines stored from one upload; the rest is summarised in one line.
MAX_LOG_LINES = 10_000
#: The bootenv machines boot once their install reported done.
AFTER_INSTALL_BOOTENV = "local"


def _unknown_token(session: Session, what: str) -> Response:
    return unknown_request(session, "install-token-unknown",
                           f"{what} with an unknown install token",
                           "unknown or expired install token\n")


@install.get("/install/<token>/<name>")
def answer_file(token: str, name: str) -> Response:
    st = state()
    with st.db.session() as session:
        machine = machine_by_install_token(session, token)
        if machine is None:
            return _unknown_token(session, f"request for {name[:64]}")
        bootenv = st.catalog.bootenvs.get(machine.bootenv)
        if bootenv is not None and name not in bootenv.templates:
            # e.g. cloud-init asking for an optional NoCloud network-config: not an error.
            return Response(f"no file {name[:64]!r} in bootenv {bootenv.name}\n", status=404,
                            mimetype="text/plain")
        try:
            body = render_machine_file(st.config, session, st.catalog, machine, name,
                                       current_target())
        except RenderError as exc:
            record_event(session, machine, "http", "answer-file-error", str(exc),
                         {"file": name, "client": request.remote_addr})
            log.error("answer file %s for %s: %s", name, machine.mac, exc)
            # The installer reports a failed download; the reason is in the events.
            return Response(f"appliance: {exc}\n", status=500, mimetype="text/plain")
        record_event(session, machine, "http", "answer-file",
                     f"served {name} for bootenv {machine.bootenv}",
                     {"file": name, "bootenv": machine.bootenv, "client": request.remote_addr})
    return Response(body, mimetype="text/plain")


def _log_lines() -> list[str]:
    """Lines of an upload: plain text, or a cloud-init/subiquity webhook event (JSON)."""
    raw = request.stream.read(MAX_LOG_BYTES + 1)
    truncated = len(raw) > MAX_LOG_BYTES
    text = raw[:MAX_LOG_BYTES].decode("utf-8", errors="replace")
    lines = text.splitlines()
    if request.mimetype == "application/json" or text.lstrip().startswith("{"):
        try:
            event = json.loads(text)
        except json.JSONDecodeError:
            event = None
        if isinstance(event, dict):
            parts = [str(event.get(k, "")) for k in
                     ("event_type", "name", "result", "description") if event.get(k)]
            lines = [" ".join(parts) or text]
    lines = [line for line in lines if line.strip()]
    if len(lines) > MAX_LOG_LINES or truncated:
        dropped = max(0, len(lines) - MAX_LOG_LINES)
        lines = lines[:MAX_LOG_LINES]
        over = f", body over {MAX_LOG_BYTES} bytes" if truncated else ""
        lines.append(f"[appliance: upload cut: {dropped} more lines{over}]")
    return lines


@install.post("/install/<token>/log")
def upload_log(token: str) -> Response:
    if (request.content_length or 0) > MAX_LOG_BYTES:
        return Response("log upload too large\n", status=413, mimetype="text/plain")
    st = state()
    with st.db.session() as session:
        machine = machine_by_install_token(session, token)
        if machine is None:
            return _unknown_token(session, "log upload")
        program = request.args.get("program", "upload")[:64]
        lines = [LogLine(severity=None, program=program, message=line, at=None)
                 for line in _log_lines()]
        count = record_install_lines(session, machine, "upload", request.remote_addr or "",
                                     lines)
        session.flush()
        trim_install_logs(session, st.config.syslog.max_lines_per_machine, [machine.id])
    return Response(f"stored {count} lines\n", mimetype="text/plain")


@install.post("/install/<token>/done")
def install_done(token: str) -> Response:
    """The installer's last step: the machine boots its own disk from now on, and the
    install token stops working (one conditional UPDATE: of two concurrent reports, or
    a report racing a new assignment, exactly one wins)."""
    st = state()
    with st.db.session() as session:
        machine = machine_by_install_token(session, token)
        if machine is None:
            return _unknown_token(session, "install-finished report")
        installed = machine.bootenv
        result = session.execute(
            update(Machine)
            .where(Machine.id == machine.id, Machine.install_token == token,
                   Machine.bootenv == installed)
            .values(bootenv=AFTER_INSTALL_BOOTENV, install_token=None)
            .execution_options(synchronize_session=False))
        if result.rowcount != 1:
            return Response("install token no longer valid\n", status=409,
                            mimetype="text/plain")
        record_event(session, machine, "machine", "install-finished",
                     f"{installed} install finished; next boot from local disk",
                     {"bootenv": installed, "client": request.remote_addr})
        session.refresh(machine)
        lifecycle_install_done(st.config, session, machine, installed,
                               request.remote_addr or "")
    return Response("ok\n", mimetype="text/plain")
