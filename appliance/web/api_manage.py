"""Write side of the JSON API for what ``appliance subnet|reservation|machine|profile``
change: on the ``api`` blueprint of :mod:`appliance.web.api` (same authentication and
errors). Every route calls the function the CLI calls (:mod:`appliance.inventory`,
:mod:`appliance.profiles`), with the user as the event's actor.
"""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify

from appliance import inventory, profiles
from appliance.models import Reservation, Subnet
from appliance.web import state
from appliance.web.api import ApiError, _actor, _body, _field, _machine, _only, api
from appliance.web.api_inventory import machine_detail


def _bad(exc: Exception) -> ApiError:
    return ApiError(400, str(exc))


def _strings(body: dict[str, Any], name: str) -> list[str] | None:
    value = _field(body, name, list, required=False)
    if value is not None and not all(isinstance(v, str) for v in value):
        raise ApiError(400, f"{name}: expected a list of strings")
    return value


@api.post("/subnets")
def post_subnet() -> tuple[Response, int]:
    body = _only(_body(), "network", "pool", "router", "dns", "domain", "lease_seconds",
                 "next_server")
    lease = _field(body, "lease_seconds", int, required=False)
    with state().db.session() as session:
        try:
            subnet = inventory.add_subnet(
                session, _field(body, "network", str),
                pool=_field(body, "pool", str, required=False),
                router=_field(body, "router", str, required=False),
                dns=_strings(body, "dns") or [],
                domain=_field(body, "domain", str, required=False) or "",
                lease_seconds=3600 if lease is None else lease,
                next_server=_field(body, "next_server", str, required=False),
                actor=_actor())
        except inventory.InventoryError as exc:
            raise _bad(exc) from None
        return jsonify(inventory.as_dict(subnet)), 201


@api.delete("/subnets/<path:ident>")
def delete_subnet(ident: str) -> Response:
    """``ident``: the subnet's id or its network (``10.0.0.0/24``)."""
    with state().db.session() as session:
        by_id = ident.isascii() and ident.isdigit() and len(ident) < 18
        subnet = session.get(Subnet, int(ident)) if by_id \
            else session.query(Subnet).filter_by(network=ident).one_or_none()
        if subnet is None:
            raise ApiError(404, f"network: no subnet {ident[:60]}")
        network = subnet.network
        inventory.delete_subnet(session, network, actor=_actor())
    return jsonify(deleted=network)


@api.post("/reservations")
def post_reservation() -> tuple[Response, int]:
    body = _only(_body(), "mac", "ip", "hostname")
    with state().db.session() as session:
        try:
            reservation = inventory.add_reservation(
                session, _field(body, "mac", str), _field(body, "ip", str),
                _field(body, "hostname", str, required=False), actor=_actor())
        except inventory.InventoryError as exc:
            raise _bad(exc) from None
        return jsonify(inventory.as_dict(reservation)), 201


@api.delete("/reservations/<mac>")
def delete_reservation(mac: str) -> Response:
    from appliance.mac import normalize_mac

    try:
        mac = normalize_mac(mac)
    except ValueError as exc:
        raise ApiError(400, f"mac: {exc}") from None
    with state().db.session() as session:
        if session.query(Reservation).filter_by(mac=mac).one_or_none() is None:
            raise ApiError(404, f"mac: no reservation for {mac}")
        inventory.delete_reservation(session, mac, actor=_actor())
    return jsonify(deleted=mac)


@api.post("/machines")
def post_machine() -> tuple[Response, int]:
    body = _only(_body(), "mac", "hostname")
    with state().db.session() as session:
        try:
            machine = inventory.add_machine(session, _field(body, "mac", str),
                                            _field(body, "hostname", str, required=False),
                                            actor=_actor())
        except inventory.InventoryError as exc:
            raise _bad(exc) from None
        return jsonify(machine_detail(session, machine)), 201


@api.patch("/machines/<ident>")
def patch_machine(ident: str) -> Response:
    """Body: ``bootenv``, ``profiles`` (replaces the list), ``params`` (object, merged),
    ``unset`` (param names), ``hostname``; as ``appliance machine set``."""
    body = _only(_body(), "bootenv", "profiles", "params", "unset", "hostname")
    st = state()
    with st.db.session() as session:
        machine = _machine(session, ident)
        try:
            profiles.configure_machine(
                session, st.catalog, machine,
                bootenv=_field(body, "bootenv", str, required=False),
                profiles=_strings(body, "profiles"),
                values=_field(body, "params", dict, required=False) or {},
                unset=_strings(body, "unset") or [],
                hostname=_field(body, "hostname", str, required=False), actor=_actor())
        except profiles.ProfileError as exc:
            raise _bad(exc) from None
        return jsonify(machine_detail(session, machine))


def _profile_row(profile: Any) -> dict[str, Any]:
    return {"name": profile.name, "description": profile.description or "",
            "params": dict(profile.params or {})}


@api.put("/profiles/<name>")
def put_profile(name: str) -> Response:
    """Body: ``params`` (object, merged), ``unset`` (names), ``description``; creates the
    profile if needed, as ``appliance profile set``."""
    body = _only(_body(), "params", "unset", "description")
    st = state()
    with st.db.session() as session:
        try:
            profile = profiles.set_profile(
                session, st.catalog, name, _field(body, "params", dict, required=False) or {},
                _strings(body, "unset") or [],
                _field(body, "description", str, required=False), actor=_actor())
        except profiles.ProfileError as exc:
            raise _bad(exc) from None
        return jsonify(_profile_row(profile))


@api.delete("/profiles/<name>")
def delete_profile(name: str) -> Response:
    with state().db.session() as session:
        try:
            profiles.get_profile(session, name)
        except profiles.ProfileError as exc:
            raise ApiError(404, str(exc)) from None
        try:
            profiles.delete_profile(session, name, actor=_actor())
        except profiles.ProfileError as exc:
            raise ApiError(409, str(exc)) from None
    return jsonify(deleted=name)
