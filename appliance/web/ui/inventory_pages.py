"""Read-only pages of what the appliance serves: subnets, reservations, leases, bootenvs,
images and profiles. Rows come from the functions the CLI and the API list with, and the
columns are the CLI's (:mod:`appliance.tables`)."""

from __future__ import annotations

import json
from typing import Any

from flask import Response, render_template, request

from appliance import listing, tables
from appliance.inventory import as_dict, list_leases, list_reservations, list_subnets
from appliance.web import state
from appliance.web.ui.access import login_required
from appliance.web.ui.pages import ui

IMAGES = ["name", "state", "size", "files", "source", "imported_at"]


def cell(value: Any) -> str:
    """A value as the page shows it: lists and mappings compactly, None as nothing."""
    if value is None:
        return ""
    if isinstance(value, list):
        return ", ".join(cell(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def _listing(title: str, rows: list[dict[str, Any]], columns: list[str], *,
             empty: str, notes: list[str] | None = None, cli: str = "") -> Response:
    return Response(render_template(
        "listing.html", title=title, columns=columns, notes=notes or [], empty=empty,
        rows=[[cell(r.get(c)) for c in columns] for r in rows], cli=cli))


@ui.get("/subnets")
@login_required
def subnets() -> Response:
    with state().db.session() as session:
        rows = [as_dict(s) for s in list_subnets(session)]
    return _listing("Subnets", rows, tables.SUBNETS, empty="no subnets: DHCP answers nobody",
                    cli="appliance subnet add 10.0.0.0/24 --pool 10.0.0.100-10.0.0.200")


@ui.get("/reservations")
@login_required
def reservations() -> Response:
    with state().db.session() as session:
        rows = [as_dict(r) for r in list_reservations(session)]
    return _listing("Reservations", rows, tables.RESERVATIONS, empty="no reservations",
                    cli="appliance reservation add MAC ADDRESS --hostname NAME")


@ui.get("/leases")
@login_required
def leases() -> Response:
    everything = request.args.get("all") == "1"
    with state().db.session() as session:
        rows = [as_dict(lease) for lease in list_leases(session, everything)]
    note = ("all leases, also released, expired and declined" if everything
            else "active leases (add ?all=1 for every lease ever handed out)")
    return _listing("Leases", rows, tables.LEASES, empty="no leases", notes=[note])


@ui.get("/bootenvs")
@login_required
def bootenvs() -> Response:
    st = state()
    rows = listing.bootenv_rows(st.catalog, st.config.images_dir)
    notes = [f"refused: {error}" for error in st.catalog.errors]
    return _listing("Boot environments", rows, tables.BOOTENVS, empty="no bootenvs",
                    notes=notes)


@ui.get("/images")
@login_required
def images() -> Response:
    st = state()
    rows = listing.image_rows(st.config, st.db)
    for row in rows:
        row["files"] = [f"{f['path']}{'' if f['present'] else ' (missing)'}"
                        for f in row["files"]]
    return _listing("Images", rows, IMAGES, empty="no images declared or imported",
                    cli="appliance images import NAME")


@ui.get("/profiles")
@login_required
def profiles() -> Response:
    with state().db.session() as session:
        rows = listing.profile_rows(session)
    return _listing("Profiles", rows, tables.PROFILES, empty="no profiles",
                    cli="appliance profile set NAME --param KEY=VALUE")
