"""Endpoints machines use while booting: iPXE scripts, check-ins, kernels and loaders."""

from __future__ import annotations

import logging
from pathlib import Path

from flask import Blueprint, Response, abort, request

from appliance.lifecycle import record_event, record_seen
from appliance.lifecycle.operations import booted
from appliance.mac import normalize_mac
from appliance.machinefiles import BootTarget, render_boot_file
from appliance.web import download_events, state
from appliance.web.files import send_path

log = logging.getLogger("appliance.http")

boot = Blueprint("boot", __name__)


def _mac_or_404(text: str) -> str:
    try:
        return normalize_mac(text)
    except ValueError:
        abort(404)


def current_target() -> BootTarget:
    """The appliance as the requesting machine reaches it."""
    config = state().config
    if config.http.public_address:
        host = config.http.public_address
        base = f"http://{host}:{config.http.port}"
    else:
        host = request.host.rsplit(":", 1)[0] if ":" in request.host else request.host
        base = f"http://{request.host}"
    return BootTarget(base_url=base, server=host)


def _boot_file(mac: str, name: str, what: str) -> Response:
    """A machine's boot file (``what`` names it in log and events); the machine is
    registered if unknown, and a file that cannot be rendered is an error file + event."""
    mac = _mac_or_404(mac)
    st = state()
    with st.db.session() as session:
        machine = record_seen(session, mac, f"http {request.remote_addr}", actor="http")
        body, error = render_boot_file(st.config, session, st.catalog, machine, name,
                                       current_target())
        if error:
            record_event(session, machine, "http", "boot-script-error", error)
            log.error("%s for %s: %s", what, mac, error)
        else:
            record_event(session, machine, "http", "boot-script",
                         f"served {what} for bootenv {machine.bootenv}",
                         {"bootenv": machine.bootenv, "client": request.remote_addr})
            booted(st.config, session, machine, request.remote_addr or "")
    return Response(body, mimetype="text/plain")


@boot.get("/boot/<mac>.ipxe")
def ipxe_script(mac: str) -> Response:
    return _boot_file(mac, "boot.ipxe", "boot script")


@boot.get("/boot/<mac>.grub")
def grub_config(mac: str) -> Response:
    """The GRUB config for UEFI machines that boot GRUB (Secure Boot) instead of iPXE."""
    return _boot_file(mac, "grub.cfg", "GRUB config")


@boot.get("/boot.ipxe")
def chain_by_mac() -> Response:
    """One fixed URL for any machine (for DHCP servers we do not run): chains by MAC."""
    script = f"#!ipxe\nchain --autofree {current_target().base_url}/boot/${{mac}}.ipxe\n"
    return Response(script, mimetype="text/plain")


@boot.route("/boot/<mac>/checkin", methods=["GET", "POST"])
def checkin(mac: str) -> Response:
    """A booted image reports in (the discovery image calls this)."""
    mac = _mac_or_404(mac)
    stage = request.values.get("stage", "")[:64]
    with state().db.session() as session:
        machine = record_seen(session, mac, f"http {request.remote_addr}", actor="http")
        record_event(session, machine, "machine", "checkin",
                     f"checked in from {request.remote_addr}" + (f" ({stage})" if stage else ""),
                     {"stage": stage, "client": request.remote_addr})
    return Response("ok\n", mimetype="text/plain")


@boot.get("/images/<path:relative>")  # GET routes answer HEAD too
def images(relative: str) -> Response:
    parts = relative.split("/")
    # The image store's work files (partial downloads, locks, staging) are not served.
    if parts[-1].endswith(".part") or any(p == ".locks" or p.startswith(".staging")
                                          for p in parts):
        abort(404)
    return send_path(state().config.images_dir, relative,
                     on_body_closed=download_events.watcher(relative))


@boot.get("/tftp/<path:relative>")
def tftp_root_over_http(relative: str) -> Response:
    """The TFTP root (boot loaders) over HTTP, for UEFI HTTP boot clients."""
    return send_path(Path(state().config.tftp.root), relative,
                     on_body_closed=download_events.watcher(relative, loader=True))


@boot.get("/healthz")
def healthz() -> Response:
    return Response("ok\n", mimetype="text/plain")
