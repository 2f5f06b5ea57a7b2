"""Read side of the JSON API: machines (paginated, filtered), one machine in full,
events, subnets, reservations, leases, bootenvs and profiles; on the ``api`` blueprint
of :mod:`appliance.web.api`, so the same authentication and error handling apply. Lists
come from :mod:`appliance.listing` and :mod:`appliance.inventory`, the functions the web
UI and the CLI use.
"""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify, request

from appliance import listing, timeline
from appliance.inventory import (
    as_dict,
    list_events,
    list_leases,
    list_reservations,
    list_subnets,
)
from appliance.models import Lease, Machine
from appliance.power import control
from appliance.web import state
from appliance.web.api import ApiError, _machine, api

MAX_EVENTS = 1000


def _int_arg(name: str, default: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ApiError(400, f"{name}: expected an integer, got {raw[:40]!r}") from None


_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


def _bool_arg(name: str) -> bool:
    values = request.args.getlist(name)
    if len(values) > 1 or (values and values[0].lower() not in _TRUE + _FALSE):
        raise ApiError(400, f"{name}: expected one of 1, 0, true, false, yes, no; got "
                            f"{', '.join(v[:20] for v in values)!r}")
    return bool(values) and values[0].lower() in _TRUE


def _event_row(event: Any) -> dict[str, Any]:
    row = as_dict(event)
    row["mac"] = event.machine.mac if event.machine else None
    return row


@api.get("/machines")
def list_machines() -> Response:
    """Query: ``state``, ``q`` (MAC, hostname or bootenv contains), ``limit`` (1-500,
    default 50), ``offset``."""
    flt = listing.MachineFilter(state=request.args.get("state", ""),
                                q=request.args.get("q", ""),
                                limit=_int_arg("limit", listing.DEFAULT_LIMIT),
                                offset=_int_arg("offset", 0))
    try:
        flt.check()
    except listing.ListingError as exc:
        raise ApiError(400, str(exc)) from None
    with state().db.session() as session:
        return jsonify(listing.machine_page(session, flt))


def machine_detail(session: Any, machine: Machine) -> dict[str, Any]:
    """Everything the machine page shows (never a credential)."""
    (summary,) = listing.summaries(session, [machine])
    leases = session.query(Lease).filter(Lease.mac == machine.mac) \
        .order_by(Lease.updated_at.desc()).limit(20).all()
    return {**summary, "first_seen_at": listing.iso(machine.first_seen_at),
            "profiles": list(machine.profiles or []), "params": dict(machine.params or {}),
            "instance_id": machine.instance_id, "deployment": machine.deployment,
            "contract": machine.contract, "ssh_host_keys": machine.ssh_host_keys,
            "phase_deadline": listing.iso(machine.phase_deadline),
            "bmc": control.bmc_summary(machine) if machine.bmc_driver else None,
            "power_checked_at": listing.iso(machine.power_checked_at),
            "power_error": machine.power_error,
            "leases": [as_dict(lease) for lease in leases]}


@api.get("/machines/<ident>")
def get_machine(ident: str) -> Response:
    with state().db.session() as session:
        return jsonify(machine_detail(session, _machine(session, ident)))


@api.get("/machines/<ident>/timeline")
def get_timeline(ident: str) -> Response:
    """The machine's last provisioning run, phase by phase (appliance/timeline.py)."""
    with state().db.session() as session:
        return jsonify(timeline.timeline_for(session, _machine(session, ident)).as_dict())


@api.get("/events")
def get_events() -> Response:
    """Query: ``machine`` (MAC or hostname), ``limit`` (1-1000, default 100); oldest
    first, the newest ``limit``."""
    limit = _int_arg("limit", 100)
    if not 1 <= limit <= MAX_EVENTS:
        raise ApiError(400, f"limit: 1 to {MAX_EVENTS}")
    ident = request.args.get("machine", "")
    with state().db.session() as session:
        mac = _machine(session, ident).mac if ident else None
        return jsonify(items=[_event_row(e) for e in list_events(session, mac, limit)])


@api.get("/subnets")
def get_subnets() -> Response:
    with state().db.session() as session:
        return jsonify(items=[as_dict(s) for s in list_subnets(session)])


@api.get("/reservations")
def get_reservations() -> Response:
    with state().db.session() as session:
        return jsonify(items=[as_dict(r) for r in list_reservations(session)])


@api.get("/leases")
def get_leases() -> Response:
    """Query: ``all=1`` includes released, expired and declined leases."""
    include_all = _bool_arg("all")
    with state().db.session() as session:
        return jsonify(items=[as_dict(lease) for lease in list_leases(session, include_all)])


@api.get("/bootenvs")
def get_bootenvs() -> Response:
    st = state()
    return jsonify(items=listing.bootenv_rows(st.catalog, st.config.images_dir),
                   refused=list(st.catalog.errors))


@api.get("/images")
def get_images() -> Response:
    st = state()
    return jsonify(items=listing.image_rows(st.config, st.db))


@api.get("/profiles")
def get_profiles() -> Response:
    with state().db.session() as session:
        return jsonify(items=listing.profile_rows(session))
