"""Endpoints an installing machine uses: its answer files, log upload, install finished.

Every URL carries the machine's one-time install token (from its kernel command line),
never a guessable id. An unknown token gets 404 and an event, never another machine's data.
"""

from __future__ import annotations

import json
import logging

from flask import Blueprint, Response, request

from appliance.lifecycle import record_event
from appliance.machinefiles import machine_by_install_token, render_machine_file
from appliance.models import Machine
from appliance.render import RenderError
from appliance.web import state
from appliance.web.boot import current_target

log = logging.getLogger("appliance.http")

install = Blueprint("install", __name__)

#: Largest log upload accepted in one request.
MAX_LOG_BYTES = 8 * 1024 * 1024
#: The bootenv machines boot once their install reported done.
AFTER_INSTALL_BOOTENV = "local"


def _unknown_token(session, what: str) -> Response:  # type: ignore[no-untyped-def]
    record_event(session, None, "http", "install-token-unknown",
                 f"{what} with an unknown install token from {request.remote_addr}",
                 {"client": request.remote_addr, "path": request.path[:200]})
    return Response("unknown or expired install token\n", status=404, mimetype="text/plain")


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


def _log_lines(machine: Machine) -> list[str]:
    """Lines of an upload: plain text, or a cloud-init/subiquity webhook event (JSON)."""
    raw = request.get_data(cache=False)[:MAX_LOG_BYTES]
    text = raw.decode("utf-8", errors="replace")
    if request.mimetype == "application/json" or text.lstrip().startswith("{"):
        try:
            event = json.loads(text)
        except json.JSONDecodeError:
            return text.splitlines()
        if isinstance(event, dict):
            parts = [str(event.get(k, "")) for k in
                     ("event_type", "name", "result", "description") if event.get(k)]
            return [" ".join(parts) or text]
    return text.splitlines()


@install.post("/install/<token>/log")
def upload_log(token: str) -> Response:
    from appliance.installlogs import LogLine, record_install_lines

    if (request.content_length or 0) > MAX_LOG_BYTES:
        return Response("log upload too large\n", status=413, mimetype="text/plain")
    st = state()
    with st.db.session() as session:
        machine = machine_by_install_token(session, token)
        if machine is None:
            return _unknown_token(session, "log upload")
        program = request.args.get("program", "upload")[:64]
        lines = [LogLine(severity=None, program=program, message=line, at=None)
                 for line in _log_lines(machine) if line.strip()]
        count = record_install_lines(session, machine, "upload", request.remote_addr or "",
                                     lines)
    return Response(f"stored {count} lines\n", mimetype="text/plain")


@install.post("/install/<token>/done")
def install_done(token: str) -> Response:
    """The installer's last step: the machine boots its own disk from now on."""
    st = state()
    with st.db.session() as session:
        machine = machine_by_install_token(session, token)
        if machine is None:
            return _unknown_token(session, "install-finished report")
        if machine.bootenv == AFTER_INSTALL_BOOTENV:
            return Response("already reported\n", mimetype="text/plain")
        installed = machine.bootenv
        machine.bootenv = AFTER_INSTALL_BOOTENV
        record_event(session, machine, "machine", "install-finished",
                     f"{installed} install finished; next boot from local disk",
                     {"bootenv": installed, "client": request.remote_addr})
    return Response("ok\n", mimetype="text/plain")
