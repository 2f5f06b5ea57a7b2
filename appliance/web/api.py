"""JSON API under ``/api/v1/``: machines' lifecycle, power and boot control (issue 6 adds
the rest).

Every call needs a user: an API token (``Authorization: Bearer``, made with ``appliance
token create``) or a web UI login session, whose writes also need its CSRF token
(``appliance/web/auth.py``). Unauthenticated: 401. Clients must also be in ``[http]
api_networks`` (default: anywhere). Errors are JSON ``{"error": message}`` naming the bad
field. Every call goes through the same functions as the CLI
(:mod:`appliance.power.control`, :mod:`appliance.lifecycle.operations`) and is recorded
with the user (``user:NAME``). A lifecycle step the machine cannot take now is 409 with
the reason.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from flask import Blueprint, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from appliance.inventory import as_dict
from appliance.lifecycle import operations
from appliance.lifecycle.states import LifecycleError
from appliance.models import Machine, PowerRequest
from appliance.power import control
from appliance.profiles import ProfileError, find_machine
from appliance.web import auth, state

api = Blueprint("api", __name__, url_prefix="/api/v1")


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@api.errorhandler(ApiError)
def _api_error(exc: ApiError) -> tuple[Response, int]:
    return jsonify(error=str(exc)), exc.status


@api.errorhandler(LifecycleError)
def _lifecycle_error(exc: LifecycleError) -> tuple[Response, int]:
    return jsonify(error=str(exc)), 409


@api.errorhandler(control.PowerError)
def _power_error(exc: control.PowerError) -> tuple[Response, int]:
    return jsonify(error=str(exc)), 400


@api.errorhandler(auth.Unauthorized)
def _unauthorized(exc: auth.Unauthorized) -> tuple[Response, int, dict[str, str]]:
    return jsonify(error=str(exc)), 401, {"WWW-Authenticate": 'Bearer realm="appliance"'}


@api.errorhandler(auth.Forbidden)
def _forbidden(exc: auth.Forbidden) -> tuple[Response, int]:
    return jsonify(error=str(exc)), 403


@api.app_errorhandler(404)
@api.app_errorhandler(405)
def _json_routing_error(exc: HTTPException) -> Response | HTTPException:
    """Under /api/v1 a path or method that matches no route is JSON too (elsewhere the
    usual page): no route is also no blueprint, so the api's own handlers miss it."""
    if not request.path.startswith(api.url_prefix or "/api/v1"):
        return exc
    if exc.code == 405:
        response = jsonify(error=f"method {request.method} is not allowed on "
                                 f"{request.path}")
        for name, value in exc.get_headers():  # keeps werkzeug's Allow header
            if name.lower() == "allow":
                response.headers["Allow"] = value
        response.status_code = 405
        return response
    response = jsonify(error=f"no such API path: {request.path}")
    response.status_code = 404
    return response


@api.get("/openapi.json")
def openapi_document() -> Response:
    from appliance.web import openapi

    return openapi.serve()


#: Served without a login: the API's description, not its data.
PUBLIC_ENDPOINTS = frozenset({"api.openapi_document"})


@api.before_request
def _authenticate() -> None:
    """Allowed network, then a user (token or session), then CSRF for session writes."""
    if request.endpoint in PUBLIC_ENDPOINTS:
        return
    allowed = state().config.http.api_networks
    try:
        client = ipaddress.ip_address(request.remote_addr or "")
    except ValueError:
        client = None
    if isinstance(client, ipaddress.IPv6Address) and client.ipv4_mapped:
        client = client.ipv4_mapped  # ::ffff:127.0.0.1 on a dual-stack bind
    if client is None or not any(client in net for net in _networks(allowed)):
        raise ApiError(403, f"the API answers only {allowed} (setting http.api_networks)")
    with state().db.session() as session:
        _, how = auth.authenticate(session)
    auth.check_csrf(how)


def _networks(spec: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(p.strip(), strict=False) for p in spec.split(",") if p.strip()]


def _actor() -> str:
    return auth.actor()


def _body(optional: bool = False) -> dict[str, Any]:
    """The JSON object sent; ``optional``: no body at all counts as ``{}``."""
    if optional and not request.get_data(cache=True):
        return {}
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, "body: expected a JSON object (Content-Type: application/json)")
    return body


def _only(body: dict[str, Any], *allowed: str) -> dict[str, Any]:
    """``body`` if it has no field outside ``allowed``; else 400 naming the first."""
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise ApiError(400, f"{unknown[0][:60]}: unknown field")
    return body


def _machine(session: Any, ident: str) -> Machine:
    try:
        return find_machine(session, ident)
    except ProfileError as exc:
        raise ApiError(404, str(exc)) from None


def _field(body: dict[str, Any], name: str, kind: type | tuple[type, ...],
           required: bool = True) -> Any:
    if name not in body:
        if required:
            raise ApiError(400, f"{name}: required")
        return None
    value = body[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ApiError(400, f"{name}: expected {getattr(kind, '__name__', kind)}, "
                            f"got {type(value).__name__}")
    return value


@api.get("/machines/<ident>/bmc")
def get_bmc(ident: str) -> Response:
    with state().db.session() as session:
        return jsonify(bmc=control.bmc_summary(_machine(session, ident)))


@api.put("/machines/<ident>/bmc")
def put_bmc(ident: str) -> Response:
    body = _only(_body(), "driver", "address", "port", "username", "password", "verify_tls",
                 "system_id")
    settings = control.BmcSettings(
        driver=_field(body, "driver", str, required=False) or "ipmi",
        address=_field(body, "address", str), username=_field(body, "username", str),
        password=_field(body, "password", str), port=_field(body, "port", int, False),
        verify_tls=_field(body, "verify_tls", bool, False) is not False,
        system_id=_field(body, "system_id", str, False) or "")
    with state().db.session() as session:
        machine = _machine(session, ident)
        control.set_bmc(state().config, session, machine, settings, _actor())
        return jsonify(bmc=control.bmc_summary(machine))


@api.delete("/machines/<ident>/bmc")
def delete_bmc(ident: str) -> Response:
    with state().db.session() as session:
        control.clear_bmc(session, _machine(session, ident), _actor())
    return jsonify(bmc=None)


@api.get("/machines/<ident>/power")
def get_power(ident: str) -> Response:
    with state().db.session() as session:
        machine = _machine(session, ident)
        return jsonify(power_state=machine.power_state,
                       checked_at=machine.power_checked_at.isoformat()
                       if machine.power_checked_at else None,
                       error=machine.power_error)


def _queue(ident: str, operation: str, args: dict[str, Any]) -> tuple[Response, int]:
    with state().db.session() as session:
        req = control.request(session, _machine(session, ident), operation, args, _actor())
        summary = as_dict(req)
    return jsonify(summary), 202


@api.post("/machines/<ident>/power")
def post_power(ident: str) -> tuple[Response, int]:
    action = _field(_only(_body(), "action"), "action", str)
    if action == "status":
        return _queue(ident, "status", {})
    return _queue(ident, "power", {"action": action})


@api.post("/machines/<ident>/boot")
def post_boot(ident: str) -> tuple[Response, int]:
    body = _only(_body(), "device", "persistent", "mode")
    return _queue(ident, "boot", {
        "device": _field(body, "device", str),
        "persistent": bool(_field(body, "persistent", bool, required=False)),
        "mode": _field(body, "mode", str, required=False)})


@api.post("/machines/<ident>/identify")
def post_identify(ident: str) -> tuple[Response, int]:
    on = _field(_only(_body(optional=True), "on"), "on", bool, required=False)
    return _queue(ident, "identify", {"on": True if on is None else on})


@api.get("/power-requests/<int:request_id>")
def get_power_request(request_id: int) -> Response:
    with state().db.session() as session:
        # An id past the database's 64-bit keys cannot exist (and must not reach SQL).
        req = session.get(PowerRequest, request_id) if request_id < 2 ** 63 else None
        if req is None:
            raise ApiError(404, f"power request {request_id} does not exist")
        return jsonify(as_dict(req))


def _lifecycle_view(machine: Machine) -> dict[str, Any]:
    return {"machine": machine.mac, "hostname": machine.hostname, "state": machine.state,
            "phase": machine.phase, "reason": machine.state_reason,
            "phase_deadline": machine.phase_deadline.isoformat()
            if machine.phase_deadline else None,
            "instance_id": machine.instance_id, "deployment": machine.deployment,
            "contract": machine.contract}


@api.get("/machines/<ident>/lifecycle")
def get_lifecycle(ident: str) -> Response:
    with state().db.session() as session:
        return jsonify(_lifecycle_view(_machine(session, ident)))


@api.post("/machines/<ident>/reimage")
def post_reimage(ident: str) -> tuple[Response, int]:
    """Body: ``bootenv`` (required), ``params`` (object), ``profiles`` (list), ``reason``."""
    from appliance.profiles import check_values

    body = _only(_body(), "bootenv", "params", "profiles", "reason")
    bootenv = _field(body, "bootenv", str)
    values = _field(body, "params", dict, required=False) or {}
    profiles = _field(body, "profiles", list, required=False)
    if profiles is not None and not all(isinstance(p, str) for p in profiles):
        raise ApiError(400, "profiles: expected a list of profile names")
    st = state()
    try:
        check_values(st.catalog, values, "params")
    except ProfileError as exc:
        raise ApiError(400, str(exc)) from None
    with st.db.session() as session:
        machine = _machine(session, ident)
        deployment = operations.reimage(
            st.config, session, st.catalog, machine, bootenv, actor=_actor(), values=values,
            profiles=profiles, reason=_field(body, "reason", str, required=False) or "")
        return jsonify({**_lifecycle_view(machine), "deployment": deployment}), \
            200 if deployment.get("unchanged") else 202


@api.post("/machines/<ident>/accept")
def post_accept(ident: str) -> Response:
    st = state()
    with st.db.session() as session:
        machine = _machine(session, ident)
        operations.accept(st.config, session, machine, _actor())
        return jsonify(_lifecycle_view(machine))


@api.post("/machines/<ident>/decommission")
def post_decommission(ident: str) -> Response:
    body = _only(_body(optional=True), "reason", "power_off")
    reason = _field(body, "reason", str, required=False) or ""
    power_off = _field(body, "power_off", bool, required=False) is not False
    st = state()
    with st.db.session() as session:
        machine = _machine(session, ident)
        operations.decommission(st.config, session, machine, actor=_actor(),
                                reason=reason, power_off=power_off)
        return jsonify(_lifecycle_view(machine))
