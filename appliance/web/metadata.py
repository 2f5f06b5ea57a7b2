"""The metadata service a provisioned machine reads (DESIGN.md, "The post-provision
contract"): EC2-compatible instance metadata with IMDSv2 session tokens, a cloud-init
NoCloud seed, and the phone-home endpoint.

Who is asking:

- EC2 paths (``/<version>/meta-data/...``, ``/<version>/user-data``, ``PUT
  /latest/api/token``): the machine the request's source address belongs to, the holder
  of its current lease, else the machine it is reserved for
  (``machinefiles.machine_by_address``). An IMDSv2 token (``web/imds_token.py``) is
  bound to that address, that machine and its deployment.
- NoCloud (``/nocloud/<seed token>/<file>``) and phone-home (``/phone-home/<seed
  token>``): the machine whose current deployment has that seed token. The token is the
  credential (the installed OS has it in its cloud-init config), so the address is not
  looked at: the machine may come back on another one.

Data is served only for a machine with a current deployment (an instance id), rendered
with the params of the bootenv that deployment installed (the machine's own bootenv is
``local`` by then). A request that names no such machine gets 404 and an event
(``metadata-unknown`` or ``seed-token-unknown``, at most one per client and minute:
``web/unknown.py``), never another machine's data; an unknown path of a known machine
is a plain 404. Every answer is ``text/plain`` and not cacheable.
"""

from __future__ import annotations

import logging
import re
from ipaddress import IPv6Address, ip_address
from typing import Any
from urllib.parse import parse_qsl

import yaml
from flask import Blueprint, Response, request
from flask.blueprints import BlueprintSetupState
from sqlalchemy.orm import Session
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.routing import BaseConverter

from appliance import secretbox
from appliance.lifecycle import operations as lifecycle
from appliance.lifecycle import record_event
from appliance.lifecycle.states import LifecycleError
from appliance.machinefiles import (
    deployment_context,
    machine_by_address,
    machine_by_seed_token,
    render_seed_user_data,
)
from appliance.models import Machine
from appliance.render import RenderError
from appliance.web import imds_token, state
from appliance.web.boot import current_target
from appliance.web.unknown import record_limited, unknown_request

log = logging.getLogger("appliance.http")

metadata = Blueprint("metadata", __name__)

#: Versions ``GET /`` lists (any ``YYYY-MM-DD`` is answered: cloud-init asks for the
#: first two).
VERSIONS = ("2009-04-04", "2021-03-23", "latest")
INSTANCE_TYPE = "bare-metal"
AVAILABILITY_ZONE = "appliance"
SECURITY_GROUPS = "default"
#: The installed OS's NoCloud vendor-data: nothing (the user-data says it all).
VENDOR_DATA = "#cloud-config\n{}\n"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
#: Largest phone-home post accepted (cloud-init's is a few SSH host keys: about 2 KiB).
MAX_PHONE_HOME_BYTES = 64 * 1024

# Event kinds.
UNKNOWN = "metadata-unknown"
SEED_UNKNOWN = "seed-token-unknown"
TOKEN_REFUSED = "imds-token-refused"
ERROR = "metadata-error"
USER_DATA = "user-data"
PHONE_HOME_REFUSED = "phone-home-refused"


class _Version(BaseConverter):
    """``latest`` or a date: nothing else reaches the EC2 views (no traversal, no
    catch-all below ``/``)."""

    regex = r"latest|\d{4}-\d{2}-\d{2}"


@metadata.record_once
def _register_converter(setup: BlueprintSetupState) -> None:
    # Runs before this blueprint's rules are added (it is recorded first).
    setup.app.url_map.converters["imdsversion"] = _Version


def _text(body: str, status: int = 200) -> Response:
    response = Response(body, status=status, mimetype="text/plain")
    response.headers["Cache-Control"] = "no-store"
    return response


def _client() -> str:
    """The request's source address (an IPv4-mapped IPv6 address as IPv4)."""
    raw = request.remote_addr or ""
    try:
        address = ip_address(raw)
    except ValueError:
        return raw
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _label(machine: Machine) -> str:
    return machine.hostname or machine.mac


def _failed(session: Session, machine: Machine | None, what: str,
            exc: Exception) -> Response:
    """500 + a ``metadata-error`` event (one per client and minute: cloud-init asks for
    every file of the tree, and again on every boot)."""
    who = _label(machine) if machine is not None else request.remote_addr
    record_limited(session, machine, ERROR, f"{what} for {who}: {exc}", {"file": what})
    log.error("%s for %s: %s", what, who, exc)
    return _text(f"appliance: {exc}\n", 500)


# -- who is asking ----------------------------------------------------------------------

_keys: dict[str, bytes] = {}


def _token_key() -> bytes:
    """The IMDSv2 signing key, derived from the state directory's key file (once per
    process)."""
    state_dir = state().config.state_dir
    key = _keys.get(state_dir)
    if key is None:
        key = _keys[state_dir] = secretbox.derived_key(state_dir, imds_token.KEY_LABEL)
    return key


def _deployed(session: Session, machine: Machine | None, what: str) -> Machine | Response:
    """The machine if it has a current deployment; else 404 + event."""
    if machine is None:
        return unknown_request(session, UNKNOWN, f"{what} (no machine has the address)",
                               "no machine with a deployment has this address\n")
    if not machine.instance_id:
        return unknown_request(session, UNKNOWN,
                               f"{what} for {_label(machine)}, which has no deployment,",
                               "no machine with a deployment has this address\n", machine)
    return machine


def _claims(session: Session, client: str) -> imds_token.Claims | Response | None:
    """The request's valid IMDSv2 token, None without one (IMDSv1), or the 401."""
    token = request.headers.get(TOKEN_HEADER)
    if token is None:
        if state().config.lifecycle.imds_require_token:
            return _text("IMDSv2 token required: PUT /latest/api/token first\n", 401)
        return None
    try:
        return imds_token.verify(_token_key(), token, address=client)
    except secretbox.SecretError as exc:
        return _failed(session, None, "IMDSv2 token", exc)
    except imds_token.TokenRefused as exc:
        if exc.suspicious:
            owner = session.get(Machine, exc.claims.machine_id) if exc.claims else None
            record_limited(session, owner, TOKEN_REFUSED,
                           f"IMDSv2 token refused from {client}: {exc.reason}",
                           {"reason": exc.reason})
        return _text(f"{exc.reason}\n", 401)


def _ec2_machine(session: Session) -> Machine | Response:
    """The machine an EC2 metadata GET is from, its token checked; or the answer."""
    client = _client()
    claims = _claims(session, client)
    if isinstance(claims, Response):
        return claims
    found = _deployed(session, machine_by_address(session, client), "metadata request")
    if isinstance(found, Response) or claims is None:
        return found
    if claims.machine_id != found.id:
        record_limited(session, found, TOKEN_REFUSED,
                       f"IMDSv2 token of another machine used from {client} (address of "
                       f"{_label(found)})", {"reason": "another machine"})
        return _text("token issued to another machine\n", 401)
    if claims.instance_id != found.instance_id:
        return _text("token issued for an earlier deployment\n", 401)
    return found


# -- the EC2 tree -----------------------------------------------------------------------

class _Dir(dict[str, Any]):
    """A directory whose listing is not just its entries' names (``public-keys/``)."""

    def __init__(self, entries: dict[str, Any], lines: list[str]) -> None:
        super().__init__(entries)
        self.lines = lines


def _public_keys(keys: list[Any]) -> _Dir:
    """``public-keys/``: ``N=<name>`` per key (the key's comment, made safe and unique:
    cloud-init's crawler keys them by name), ``N/openssh-key`` the key on one line."""
    entries: dict[str, Any] = {}
    lines: list[str] = []
    names: set[str] = set()
    for text in keys:
        key = " ".join(str(text).split())
        if not key:
            continue
        index = str(len(entries))
        fields = key.split(" ", 2)
        name = re.sub(r"[^A-Za-z0-9._@+-]", "-", fields[2])[:64] if len(fields) == 3 else ""
        name = name or f"key-{index}"
        if name in names:
            name = f"{name}-{index}"
        names.add(name)
        entries[index] = {"openssh-key": key}
        lines.append(f"{index}={name}")
    return _Dir(entries, lines)


def _tree(machine: Machine, context: dict[str, Any], client: str) -> dict[str, Any]:
    instance_id = machine.instance_id or ""
    hostname = str(context["machine"]["hostname"])
    bootenv = context["bootenv"].name
    return {
        "ami-id": "ami-" + (re.sub(r"[^a-z0-9]+", "-", bootenv.lower()).strip("-") or "os"),
        "ami-launch-index": "0",
        "hostname": hostname,
        "instance-id": instance_id,
        "instance-type": INSTANCE_TYPE,
        "local-hostname": hostname,
        "local-ipv4": client,
        "mac": machine.mac,
        "placement": {"availability-zone": AVAILABILITY_ZONE},
        "public-keys": _public_keys(list(context["params"].get("ssh_authorized_keys") or [])),
        "reservation-id": "r-" + instance_id.removeprefix("i-"),
        "security-groups": SECURITY_GROUPS,
    }


def _lookup(tree: dict[str, Any], path: str) -> str | None:
    """A leaf's value or a directory's listing (subdirectories with a trailing slash, as
    EC2 lists them); None when the path is not in the tree."""
    node: Any = tree
    path = path[:-1] if path.endswith("/") else path
    for part in path.split("/") if path else []:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, _Dir):
        return "\n".join(node.lines)
    if isinstance(node, dict):
        return "\n".join(f"{k}/" if isinstance(v, dict) else k for k, v in node.items())
    return str(node)


def _context(session: Session, machine: Machine, what: str) -> dict[str, Any] | Response:
    st = state()
    try:
        return deployment_context(st.config, session, st.catalog, machine, current_target())
    except RenderError as exc:
        return _failed(session, machine, what, exc)


def _user_data(session: Session, machine: Machine, source: str) -> Response:
    st = state()
    try:
        body = render_seed_user_data(st.config, session, st.catalog, machine,
                                     current_target())
    except RenderError as exc:
        return _failed(session, machine, "user-data", exc)
    if not body.strip():
        return _text("no user-data\n", 404)
    number = (machine.deployment or {}).get("number")
    record_event(session, machine, "http", USER_DATA,
                 f"served user-data ({source}) of deployment {number or '?'}",
                 {"source": source, "client": request.remote_addr,
                  "instance_id": machine.instance_id})
    return _text(body)


@metadata.get("/")
def versions() -> Response:
    return _text("\n".join(VERSIONS))


@metadata.get("/<imdsversion:version>")
@metadata.get("/<imdsversion:version>/")
def version_index(version: str) -> Response:
    return _text("meta-data\nuser-data")


@metadata.get("/<imdsversion:version>/meta-data")
@metadata.get("/<imdsversion:version>/meta-data/")
def meta_data_index(version: str) -> Response:
    return meta_data(version, "")


@metadata.get("/<imdsversion:version>/meta-data/<path:path>")
def meta_data(version: str, path: str) -> Response:
    with state().db.session() as session:
        found = _ec2_machine(session)
        if isinstance(found, Response):
            return found
        context = _context(session, found, "meta-data")
        if isinstance(context, Response):
            return context
        body = _lookup(_tree(found, context, _client()), path)
    if body is None:
        return _text(f"no meta-data {path[:64]!r}\n", 404)
    return _text(body)


@metadata.get("/<imdsversion:version>/user-data")
def ec2_user_data(version: str) -> Response:
    with state().db.session() as session:
        found = _ec2_machine(session)
        if isinstance(found, Response):
            return found
        return _user_data(session, found, "ec2")


def _ttl(limit: int) -> int | Response:
    raw = request.headers.get(TTL_HEADER, "").strip()
    if not re.fullmatch(r"[0-9]{1,9}", raw) or not 1 <= int(raw) <= limit:
        return _text(f"{TTL_HEADER} must be a whole number of seconds from 1 to {limit}\n",
                     400)
    return int(raw)


@metadata.put("/latest/api/token")
def api_token() -> Response:
    """An IMDSv2 session token for the machine at the request's address."""
    st = state()
    client = _client()
    if "X-Forwarded-For" in request.headers:
        # As EC2 does: a request relayed by a proxy (an SSRF) gets no token.
        with st.db.session() as session:
            record_limited(session, None, TOKEN_REFUSED,
                           f"IMDSv2 token request through a proxy from {client} refused",
                           {"reason": "X-Forwarded-For",
                            "forwarded_for": request.headers["X-Forwarded-For"][:200]})
        return _text("a forwarded request gets no token\n", 403)
    ttl = _ttl(st.config.lifecycle.imds_token_max_ttl)
    if isinstance(ttl, Response):
        return ttl
    with st.db.session() as session:
        found = _deployed(session, machine_by_address(session, client), "IMDSv2 token request")
        if isinstance(found, Response):
            return found
        try:
            key = _token_key()
        except secretbox.SecretError as exc:
            return _failed(session, found, "IMDSv2 token", exc)
        token = imds_token.issue(key, machine_id=found.id, address=client,
                                 instance_id=found.instance_id or "", ttl=ttl)
    response = _text(token)
    response.headers[TTL_HEADER] = str(ttl)
    return response


# -- NoCloud and phone-home -------------------------------------------------------------

def _seed_machine(session: Session, token: str, what: str) -> Machine | Response:
    machine = machine_by_seed_token(session, token)
    if machine is None or not machine.instance_id:
        return unknown_request(session, SEED_UNKNOWN, f"{what} with an unknown seed token",
                               "unknown seed token\n", machine)
    return machine


@metadata.get("/nocloud/<token>/<name>")
def nocloud(token: str, name: str) -> Response:
    with state().db.session() as session:
        found = _seed_machine(session, token, f"NoCloud {name[:64]} request")
        if isinstance(found, Response):
            return found
        if name == "user-data":
            return _user_data(session, found, "nocloud")
        if name == "vendor-data":
            return _text(VENDOR_DATA)
        if name != "meta-data":
            # e.g. network-config, which cloud-init asks for optionally: not an error.
            return _text(f"no file {name[:64]!r} in the NoCloud seed\n", 404)
        context = _context(session, found, "meta-data")
        if isinstance(context, Response):
            return context
        hostname = str(context["machine"]["hostname"])
        body = yaml.safe_dump({"instance-id": found.instance_id, "local-hostname": hostname,
                               "hostname": hostname}, sort_keys=False)
    return _text(body)


def _phone_home_form() -> dict[str, str] | None:
    """The form-encoded body (first value of each field), or None when it is over
    :data:`MAX_PHONE_HOME_BYTES`. Read here rather than by ``request.form``, which cuts
    a chunked body at the limit silently instead of refusing it."""
    limit = MAX_PHONE_HOME_BYTES
    request.max_content_length = limit + 1  # the stream stops one byte past the limit
    chunks: list[bytes] = []
    size = 0
    try:
        while size <= limit:
            chunk = request.stream.read(limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except RequestEntityTooLarge:
        return None
    if size > limit:
        return None
    form: dict[str, str] = {}
    for key, value in parse_qsl(b"".join(chunks).decode("utf-8", errors="replace"),
                                keep_blank_values=True):
        form.setdefault(key, value)
    return form


@metadata.post("/phone-home/<token>")
def phone_home(token: str) -> Response:
    """cloud-init's phone_home post from the installed OS: it is up (lifecycle
    installing/first-boot -> installing/contract)."""
    too_large = _text(f"phone-home post over {MAX_PHONE_HOME_BYTES} bytes\n", 413)
    if (request.content_length or 0) > MAX_PHONE_HOME_BYTES:
        return too_large
    st = state()
    client = _client()
    with st.db.session() as session:
        found = _seed_machine(session, token, "phone-home")
        if isinstance(found, Response):
            return found
        form = _phone_home_form()
        if form is None:
            return too_large
        try:
            with session.begin_nested():  # a refused step leaves nothing behind
                lifecycle.phone_home(st.config, session, found, form, client)
        except LifecycleError as exc:
            record_limited(session, found, PHONE_HOME_REFUSED, str(exc),
                           {"instance_id": form.get("instance_id", "")[:64]})
            log.warning("phone-home from %s refused: %s", client, exc)
            return _text(f"{exc}\n", 409)
    return _text("ok\n")
