"""The machine page's power, next-boot and identify buttons. Each queues a request with
:func:`appliance.power.control.request`, as ``appliance power`` and the API do; the
``power`` part runs it and the page follows its outcome. Powering off, cycling or
resetting a machine first asks for a confirmation (a page with a second button), so
a stray click never takes a machine down.
"""

from __future__ import annotations

from typing import Any

from flask import Response, redirect, render_template, request, url_for

from appliance.power import control
from appliance.power.driver import BOOT_DEVICES, POWER_ACTIONS
from appliance.profiles import ProfileError, find_machine
from appliance.web import auth, state
from appliance.web.ui.access import login_required
from appliance.web.ui.pages import ui

#: Actions that interrupt a running machine: confirmed on a second page.
DESTRUCTIVE = frozenset({"off", "cycle", "reset", "soft-off"})


def _refused(message: str, status: int) -> Response:
    return Response(render_template("error.html", message=message), status=status)


def _queue(ident: str, operation: str, args: dict[str, Any], what: str,
           confirm: bool = False) -> Response:
    with state().db.session() as session:
        try:
            machine = find_machine(session, ident)
        except ProfileError as exc:
            return _refused(str(exc), 404)
        label = machine.hostname or machine.mac
        if confirm and request.form.get("confirmed") != "yes":
            return Response(render_template(
                "confirm_power.html", what=what, label=label, mac=machine.mac,
                action_url=request.path, fields={k: v for k, v in request.form.items()
                                                 if k not in ("csrf_token", "confirmed")}))
        try:
            req = control.request(session, machine, operation, args, auth.actor())
        except control.PowerError as exc:
            return _refused(str(exc), 400)
        request_id, mac = req.id, machine.mac
    return redirect(url_for("ui.machine", ident=mac, queued=request_id))


@ui.post("/machines/<ident>/power")
@login_required
def machine_power(ident: str) -> Response:
    action = request.form.get("action", "")
    if action == "status":
        return _queue(ident, "status", {}, "read the power state")
    if action not in POWER_ACTIONS:
        return _refused(f"action: {action[:40]!r} is not one of status, "
                        f"{', '.join(POWER_ACTIONS)}", 400)
    return _queue(ident, "power", {"action": action}, f"power {action}",
                  confirm=action in DESTRUCTIVE)


@ui.post("/machines/<ident>/boot")
@login_required
def machine_boot(ident: str) -> Response:
    device = request.form.get("device", "")
    if device not in BOOT_DEVICES:
        return _refused(f"device: {device[:40]!r} is not one of {', '.join(BOOT_DEVICES)}",
                        400)
    persistent = request.form.get("persistent") in ("on", "1", "yes")
    how = "every boot" if persistent else "next boot only"
    return _queue(ident, "boot", {"device": device, "persistent": persistent},
                  f"boot {device} ({how})")


@ui.post("/machines/<ident>/identify")
@login_required
def machine_identify(ident: str) -> Response:
    on = request.form.get("on", "")
    if on not in ("on", "off"):
        return _refused(f"on: {on[:40]!r} is not one of on, off", 400)
    return _queue(ident, "identify", {"on": on == "on"}, f"identify light {on}")
