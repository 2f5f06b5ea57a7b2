"""The UI's pages: login, the machine list, a machine (with its boot timeline; its power
controls are in ``power_forms``), the reimage form and its live progress. Reads go
through :mod:`appliance.listing` and the API's machine view; the reimage through
:func:`appliance.lifecycle.operations.reimage`, as the CLI and the API.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, redirect, render_template, request, url_for
from sqlalchemy import select

from appliance import listing, timeline
from appliance.auth import throttle, users
from appliance.inventory import as_dict
from appliance.lifecycle import operations
from appliance.lifecycle.states import STATES, LifecycleError
from appliance.models import PowerRequest
from appliance.power import control
from appliance.profiles import ProfileError, find_machine, list_profiles, parse_assignments
from appliance.web import auth, state
from appliance.web.api_inventory import machine_detail
from appliance.web.ui import timeline_view
from appliance.web.ui.access import login_required, safe_next

ui = Blueprint("ui", __name__, url_prefix="/ui", template_folder="templates",
               static_folder="static")
PAGE_SIZE = 50
#: Next-boot devices offered on a machine's page (the API and CLI take every one).
PAGE_BOOT_DEVICES = ("pxe", "disk", "cdrom")
#: Machines one bulk reimage may take (the form lists them all for the confirmation).
MAX_BULK = 200


@ui.app_context_processor
def _template_globals() -> dict[str, Any]:
    from flask import g

    return {"csrf_token": auth.csrf_token, "user_name": g.get("auth_user_name")}


def _page(template: str, status: int = 200, **context: Any) -> Response:
    return Response(render_template(template, **context), status=status)


@ui.get("/")
def index() -> Response:
    return redirect(url_for("ui.machines"))


@ui.route("/login", methods=["GET", "POST"])
def login() -> Response:
    target = safe_next(request.values.get("next"))
    if request.method == "GET":
        return _page("login.html", next=target)
    try:
        auth.check_csrf("session")
    except auth.Forbidden as exc:
        return _page("login.html", 403, next=target, error=str(exc))
    name = request.form.get("name", "").strip()
    client = request.remote_addr or "?"
    with state().db.session() as session:
        wait = throttle.retry_after(session, name, client)
        if wait:
            response = _page("login.html", 429, next=target, name=name,
                             error=f"too many failed logins as {name!r}; try again in "
                                   f"{wait} s")
            response.headers["Retry-After"] = str(wait)
            return response
        user = users.authenticate(session, name, request.form.get("password", ""))
        if user is not None:
            auth.log_in(user)
            return redirect(target)
        throttle.record_failure(session, name, client)
    return _page("login.html", 401, next=target, name=name,
                 error="wrong user name or password")


@ui.post("/logout")
@login_required
def logout() -> Response:
    auth.log_out()
    return redirect(url_for("ui.login"))


def _int(name: str, default: int) -> int:
    try:
        return max(int(request.args.get(name, default)), 1)
    except ValueError:
        return default


@ui.get("/machines")
@login_required
def machines() -> Response:
    page_no = _int("page", 1)
    state_filter = request.args.get("state", "")
    q = request.args.get("q", "").strip()
    flt = listing.MachineFilter(state=state_filter, q=q, limit=PAGE_SIZE,
                                offset=(page_no - 1) * PAGE_SIZE)
    try:
        flt.check()
    except listing.ListingError as exc:
        return _page("error.html", 400, message=str(exc))
    with state().db.session() as session:
        page = listing.machine_page(session, flt)
    pages = max(1, -(-page["total"] // PAGE_SIZE))
    return _page("machines.html", page=page, page_no=page_no, pages=pages, states=STATES,
                 state_filter=state_filter, q=q)


@ui.get("/machines/<ident>")
@login_required
def machine(ident: str) -> Response:
    from appliance.inventory import list_events

    with state().db.session() as session:
        try:
            found = find_machine(session, ident)
        except ProfileError as exc:
            return _page("error.html", 404, message=str(exc))
        detail = machine_detail(session, found)
        events = [{"at": e.at.isoformat(timespec="seconds"), "actor": e.actor,
                   "kind": e.kind, "message": e.message}
                  for e in reversed(list_events(session, found.mac, 50))]
        tl = timeline.timeline_for(session, found)
        requests = [as_dict(r) for r in session.scalars(
            select(PowerRequest).where(PowerRequest.machine_id == found.id)
            .order_by(PowerRequest.id.desc()).limit(5))]
        power_alive = control.power_part_alive(session)
    return _page("machine.html", m=detail, events=events, requests=requests,
                 power_alive=power_alive, queued=request.args.get("queued", type=int),
                 boot_devices=PAGE_BOOT_DEVICES, **_timeline_context(tl, ident))


def _timeline_context(tl: timeline.Timeline, ident: str) -> dict[str, Any]:
    return {"tl": tl, "rows": timeline_view.rows(tl), "geometry": timeline_view,
            "fmt": timeline_view.duration_text, "ident": ident}


@ui.get("/machines/<ident>/timeline")
@login_required
def machine_timeline(ident: str) -> Response:
    """The timeline alone (the machine page's script swaps it in while a run goes on)."""
    with state().db.session() as session:
        try:
            found = find_machine(session, ident)
        except ProfileError as exc:
            return _page("error.html", 404, message=str(exc))
        tl = timeline.timeline_for(session, found)
    return _page("_timeline.html", **_timeline_context(tl, ident))


def _installing_bootenvs() -> list[str]:
    return sorted(name for name, env in state().catalog.bootenvs.items() if env.installs)


def _form_context(macs: list[str], **extra: Any) -> dict[str, Any]:
    with state().db.session() as session:
        chosen = [machine_detail(session, find_machine(session, mac)) for mac in macs]
        profiles = [p.name for p in list_profiles(session)]
    return {"machines": chosen, "bootenvs": _installing_bootenvs(), "profiles": profiles,
            **extra}


def expected_confirmation(machines: list[dict[str, Any]]) -> str:
    """What the operator must type: the machine's name for one, the count for many."""
    if len(machines) == 1:
        return machines[0]["hostname"] or machines[0]["mac"]
    return str(len(machines))


@ui.get("/reimage")
@login_required
def reimage_form() -> Response:
    macs = request.args.getlist("m")
    if not macs:
        return _page("error.html", 400, message="choose one or more machines in the list")
    if len(macs) > MAX_BULK:
        return _page("error.html", 400, message=f"at most {MAX_BULK} machines at once")
    try:
        context = _form_context(macs)
    except ProfileError as exc:
        return _page("error.html", 404, message=str(exc))
    return _page("reimage.html", form={}, **context)


@ui.post("/reimage")
@login_required
def reimage_submit() -> Response:
    form = request.form
    macs = form.getlist("m")
    if not macs or len(macs) > MAX_BULK:
        return _page("error.html", 400, message=f"machines: 1 to {MAX_BULK}")
    try:
        context = _form_context(macs)
    except ProfileError as exc:
        return _page("error.html", 404, message=str(exc))

    def refuse(message: str) -> Response:
        return _page("reimage.html", 400, form=form, error=message, **context)

    bootenv = form.get("bootenv", "")
    if bootenv not in context["bootenvs"]:
        return refuse(f"bootenv: choose one of {', '.join(context['bootenvs'])}")
    wanted = expected_confirmation(context["machines"])
    if form.get("confirm", "").strip() != wanted:
        what = "the machine's name" if len(macs) == 1 else "the number of machines"
        return refuse(f"confirm: type {what}, {wanted!r}, to reimage")
    lines = [line.strip() for line in form.get("params", "").splitlines() if line.strip()]
    profiles = [p for p in form.getlist("profile") if p] or None
    st = state()
    try:
        values = parse_assignments(st.catalog, lines)
        with st.db.session() as session:  # all or none: one refusal rolls back the others
            for mac in macs:
                operations.reimage(st.config, session, st.catalog, find_machine(session, mac),
                                   bootenv, actor=auth.actor(), values=values,
                                   profiles=profiles, reason=form.get("reason", "").strip())
    except (ProfileError, LifecycleError) as exc:
        return refuse(str(exc))
    return redirect(url_for("ui.progress", m=macs))


@ui.get("/progress")
@login_required
def progress() -> Response:
    macs = request.args.getlist("m")[:MAX_BULK]
    try:
        context = _form_context(macs)
    except ProfileError as exc:
        return _page("error.html", 404, message=str(exc))
    return _page("progress.html", machines=context["machines"])
