"""The OpenAPI 3.0 document of ``/api/v1``, served at ``/api/v1/openapi.json`` (no login
needed: it describes, it does not reveal). Written by hand next to the code it
describes; ``tests/unit/test_openapi.py`` checks that every route of the ``api``
blueprint is in it with the same methods, and nothing else is.
"""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify

from appliance.lifecycle.states import STATES
from appliance.listing import MAX_LIMIT, MAX_OFFSET
from appliance.power.calls import DRIVERS
from appliance.power.driver import BOOT_DEVICES, BOOT_MODES, POWER_ACTIONS
from appliance.timeline import PHASES


def _nullable(kind: str, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "nullable": True, **extra}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    why = {400: "a bad field (the message names it)", 401: "no valid credential",
           403: "not from http.api_networks, or a session write without its CSRF token",
           404: "no such machine or request", 409: "the machine cannot take that step now"}
    return {str(code): _json(_ref("Error"), why[code]) for code in codes}


ANY_OBJECT: dict[str, Any] = {"type": "object", "additionalProperties": True}
IDENT = {"name": "ident", "in": "path", "required": True, "schema": {"type": "string"},
         "description": "the machine's MAC or hostname"}
COMMON = (400, 401, 403)
PROFILE_NAME = {"name": "name", "in": "path", "required": True,
                "schema": {"type": "string"}}

MACHINE_SUMMARY: dict[str, Any] = {
    "type": "object",
    "required": ["mac", "hostname", "state", "phase", "bootenv", "address",
                 "power_state", "last_event"],
    "properties": {
        "mac": {"type": "string"}, "hostname": _nullable("string"),
        "state": {"type": "string", "enum": list(STATES)}, "phase": _nullable("string"),
        "bootenv": {"type": "string"}, "address": _nullable("string"),
        "power_state": _nullable("string"), "bmc": _nullable("string"),
        "arch": _nullable("string"), "seen_on": _nullable("string"),
        "state_reason": _nullable("string"), "last_seen_at": _nullable("string"),
        "last_event": _ref("LastEvent")}}

SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"],
              "properties": {"error": {"type": "string"}}},
    "Timeline": {"type": "object", "required": ["outcome", "phases"], "properties": {
        "outcome": {"type": "string", "enum": ["none", "running", "ready", "failed", "ended"]},
        "started": _nullable("string"), "ended": _nullable("string"),
        "seconds": _nullable("number"), "bootenv": {"type": "string"},
        "deployment": _nullable("integer"), "reason": {"type": "string"},
        "phases": {"type": "array", "items": _ref("TimelinePhase")}}},
    "TimelinePhase": {"type": "object", "required": ["phase", "status"], "properties": {
        "phase": {"type": "string", "enum": [key for key, _ in PHASES]},
        "label": {"type": "string"},
        "status": {"type": "string",
                   "enum": ["done", "running", "failed", "skipped", "pending", "ended"]},
        "start": _nullable("string"), "end": _nullable("string"),
        "seconds": _nullable("number"), "detail": {"type": "string"},
        "problems": {"type": "array", "items": {"type": "string"}}}},
    "LastEvent": {"type": "object", "nullable": True,
                  "properties": {"at": {"type": "string"}, "kind": {"type": "string"},
                                 "actor": {"type": "string"}, "message": {"type": "string"}}},
    "MachineSummary": MACHINE_SUMMARY,
    "MachinePage": {
        "type": "object", "required": ["items", "total", "limit", "offset", "states"],
        "properties": {
            "items": {"type": "array", "items": _ref("MachineSummary")},
            "total": {"type": "integer"}, "limit": {"type": "integer"},
            "offset": {"type": "integer"},
            "states": {"type": "object", "additionalProperties": {"type": "integer"}}}},
    "Bmc": {"type": "object", "nullable": True,
            "properties": {"driver": {"type": "string"}, "address": _nullable("string"),
                           "port": _nullable("integer"), "username": _nullable("string"),
                           "password_set": {"type": "boolean"},
                           "verify_tls": _nullable("boolean"),
                           "system_id": _nullable("string")}},
    "MachineDetail": {  # the summary's fields, but ``bmc`` is the settings in full
        "type": "object", "required": MACHINE_SUMMARY["required"],
        "properties": {
            **MACHINE_SUMMARY["properties"],
            "first_seen_at": _nullable("string"),
            "profiles": {"type": "array", "items": {"type": "string"}},
            "params": ANY_OBJECT, "instance_id": _nullable("string"),
            "deployment": _nullable("object"), "contract": _nullable("object"),
            "ssh_host_keys": _nullable("object"), "phase_deadline": _nullable("string"),
            "bmc": _ref("Bmc"), "power_checked_at": _nullable("string"),
            "power_error": _nullable("string"),
            "leases": {"type": "array", "items": ANY_OBJECT}}},
    "Event": {"type": "object", "required": ["id", "at", "actor", "kind", "message"],
              "properties": {"id": {"type": "integer"}, "at": {"type": "string"},
                             "machine_id": _nullable("integer"), "mac": _nullable("string"),
                             "actor": {"type": "string"}, "kind": {"type": "string"},
                             "message": {"type": "string"}, "details": _nullable("object")}},
    "Lifecycle": {
        "type": "object", "required": ["machine", "state"],
        "properties": {"machine": {"type": "string"}, "hostname": _nullable("string"),
                       "state": {"type": "string", "enum": list(STATES)},
                       "phase": _nullable("string"), "reason": _nullable("string"),
                       "phase_deadline": _nullable("string"),
                       "instance_id": _nullable("string"),
                       "deployment": _nullable("object"), "contract": _nullable("object")}},
    "PowerRequest": {
        "type": "object", "required": ["id", "operation", "state", "actor"],
        "properties": {"id": {"type": "integer"}, "machine_id": {"type": "integer"},
                       "operation": {"type": "string"}, "purpose": _nullable("string"),
                       "args": ANY_OBJECT, "actor": {"type": "string"},
                       "state": {"type": "string", "enum": ["queued", "running", "succeeded",
                                                            "failed", "cancelled"]},
                       "result": _nullable("object"), "error": _nullable("string"),
                       "error_kind": _nullable("string"), "attempts": {"type": "integer"},
                       "created_at": {"type": "string"}, "started_at": _nullable("string"),
                       "finished_at": _nullable("string")}},
}


def _body(properties: dict[str, Any], required: list[str] | None = None,
          optional_body: bool = False) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties,
                              "additionalProperties": False}
    if required:
        schema["required"] = required
    return {"required": not optional_body,
            "content": {"application/json": {"schema": schema}}}


def _op(summary: str, responses: dict[str, Any], *, params: list[Any] | None = None,
        body: dict[str, Any] | None = None, errors: tuple[int, ...] = COMMON) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {**responses, **_errors(*errors)}}
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = body
    return op


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


MACHINE_ERRORS = (*COMMON, 404)
LIFECYCLE_ERRORS = (*COMMON, 404, 409)
QUEUED = {"202": _json(_ref("PowerRequest"), "queued for the power part")}
BMC_BODY = _body({"driver": {"type": "string", "enum": list(DRIVERS)},
                  "address": {"type": "string"}, "port": {"type": "integer"},
                  "username": {"type": "string"}, "password": {"type": "string"},
                  "verify_tls": {"type": "boolean"}, "system_id": {"type": "string"}},
                 ["address", "username", "password"])

PATHS: dict[str, Any] = {
    "/machines": {"get": _op(
        "a page of machines", {"200": _json(_ref("MachinePage"), "the page")}, params=[
            _query("state", {"type": "string", "enum": list(STATES)}, "only this state"),
            _query("q", {"type": "string", "maxLength": 64},
                   "MAC, hostname or bootenv contains"),
            _query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
                   "page size"),
            _query("offset", {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET},
                   "rows to skip")])},
    "/machines/{ident}": {"get": _op(
        "one machine in full", {"200": _json(_ref("MachineDetail"), "the machine")},
        params=[IDENT], errors=MACHINE_ERRORS)},
    "/events": {"get": _op(
        "the newest events, oldest first",
        {"200": _json({"type": "object", "required": ["items"],
                       "properties": {"items": {"type": "array", "items": _ref("Event")}}},
                      "events")},
        params=[_query("machine", {"type": "string"}, "MAC or hostname"),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000},
                       "how many")], errors=MACHINE_ERRORS)},
    "/machines/{ident}/bmc": {
        "get": _op("the machine's BMC settings (never the password)",
                   {"200": _json({"type": "object", "properties": {"bmc": _ref("Bmc")}},
                                 "settings")}, params=[IDENT], errors=MACHINE_ERRORS),
        "put": _op("set the machine's BMC", {"200": _json(
            {"type": "object", "properties": {"bmc": _ref("Bmc")}}, "stored")},
            params=[IDENT], body=BMC_BODY, errors=MACHINE_ERRORS),
        "delete": _op("remove the machine's BMC settings", {"200": _json(
            {"type": "object", "properties": {"bmc": _ref("Bmc")}}, "removed")},
            params=[IDENT], errors=MACHINE_ERRORS)},
    "/machines/{ident}/power": {
        "get": _op("last polled power state", {"200": _json({
            "type": "object", "properties": {"power_state": _nullable("string"),
                                             "checked_at": _nullable("string"),
                                             "error": _nullable("string")}}, "state")},
            params=[IDENT], errors=MACHINE_ERRORS),
        "post": _op("a power action, or a fresh status", QUEUED,
                    params=[IDENT], body=_body({"action": {"type": "string", "enum": [
                        "status", *POWER_ACTIONS]}}, ["action"]),
                    errors=MACHINE_ERRORS)},
    "/machines/{ident}/boot": {"post": _op(
        "next boot device", QUEUED, params=[IDENT], body=_body({
            "device": {"type": "string", "enum": list(BOOT_DEVICES)},
            "persistent": {"type": "boolean"},
            "mode": {"type": "string", "enum": list(BOOT_MODES)}}, ["device"]),
        errors=MACHINE_ERRORS)},
    "/machines/{ident}/identify": {"post": _op(
        "identify light on or off", QUEUED, params=[IDENT],
        body=_body({"on": {"type": "boolean"}}, optional_body=True), errors=MACHINE_ERRORS)},
    "/power-requests/{request_id}": {"get": _op(
        "one power request and its outcome", {"200": _json(_ref("PowerRequest"), "it")},
        params=[{"name": "request_id", "in": "path", "required": True,
                 "schema": {"type": "integer"}}], errors=MACHINE_ERRORS)},
    "/machines/{ident}/lifecycle": {"get": _op(
        "state, phase, deployment and contract", {"200": _json(_ref("Lifecycle"), "it")},
        params=[IDENT], errors=MACHINE_ERRORS)},
    "/machines/{ident}/timeline": {"get": _op(
        "the last provisioning run phase by phase, from the events",
        {"200": _json(_ref("Timeline"), "it")}, params=[IDENT], errors=MACHINE_ERRORS)},
    "/machines/{ident}/reimage": {"post": _op(
        "start a new deployment, from any state",
        {"202": _json(_ref("Lifecycle"), "started"),
         "200": _json(_ref("Lifecycle"), "already being reimaged so; nothing new")},
        params=[IDENT], body=_body({"bootenv": {"type": "string"}, "params": ANY_OBJECT,
                                    "profiles": {"type": "array",
                                                 "items": {"type": "string"}},
                                    "reason": {"type": "string"}}, ["bootenv"]),
        errors=LIFECYCLE_ERRORS)},
    "/machines/{ident}/accept": {"post": _op(
        "a discovered machine becomes available", {"200": _json(_ref("Lifecycle"), "done")},
        params=[IDENT], errors=LIFECYCLE_ERRORS)},
    "/machines/{ident}/decommission": {"post": _op(
        "end the deployment (and power off)", {"200": _json(_ref("Lifecycle"), "done")},
        params=[IDENT], body=_body({"reason": {"type": "string"},
                                    "power_off": {"type": "boolean"}}, optional_body=True),
        errors=LIFECYCLE_ERRORS)},
}


def _items(description: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"items": [objects]}``: rows of a table, columns as the CLI's ``--json`` has them."""
    return {"200": _json({"type": "object", "required": ["items"],
                          "properties": {"items": {"type": "array", "items": ANY_OBJECT},
                                         **(extra or {})}}, description)}


PATHS.update({
    "/subnets": {"get": _op("subnets", _items("subnets"))},
    "/reservations": {"get": _op("reservations", _items("reservations"))},
    "/images": {"get": _op("artifacts declared or imported, with their state",
                           _items("images"))},
    "/leases": {"get": _op("DHCP leases", _items("leases"), params=[
        _query("all", {"type": "string", "enum": ["0", "1", "true", "false", "yes", "no"]},
               "1: also released, expired and declined leases")])},
    "/bootenvs": {"get": _op("boot environments and whether their images are present",
                             _items("bootenvs", {"refused": {
                                 "type": "array", "items": {"type": "string"}}}))},
    "/profiles": {"get": _op("profiles and their params", _items("profiles"))},
})

_STRINGS = {"type": "array", "items": {"type": "string"}}
_DELETED = {"200": _json({"type": "object", "required": ["deleted"],
                          "properties": {"deleted": {"type": "string"}}}, "deleted")}
_PROFILE = {"type": "object", "required": ["name", "params"],
            "properties": {"name": {"type": "string"}, "description": {"type": "string"},
                           "params": ANY_OBJECT}}
PATHS["/subnets"]["post"] = _op("add a subnet", {"201": _json(ANY_OBJECT, "added")},
                                body=_body({"network": {"type": "string"},
                                            "pool": {"type": "string"},
                                            "router": {"type": "string"}, "dns": _STRINGS,
                                            "domain": {"type": "string"},
                                            "lease_seconds": {"type": "integer"},
                                            "next_server": {"type": "string"}}, ["network"]))
PATHS["/reservations"]["post"] = _op(
    "reserve an address for a MAC", {"201": _json(ANY_OBJECT, "reserved")},
    body=_body({"mac": {"type": "string"}, "ip": {"type": "string"},
                "hostname": {"type": "string"}}, ["mac", "ip"]))
PATHS["/machines"]["post"] = _op(
    "enroll a machine by MAC", {"201": _json(_ref("MachineDetail"), "added")},
    body=_body({"mac": {"type": "string"}, "hostname": {"type": "string"}}, ["mac"]))
PATHS["/machines/{ident}"]["patch"] = _op(
    "set bootenv, profiles, params, hostname", {"200": _json(_ref("MachineDetail"), "it")},
    params=[IDENT], body=_body({"bootenv": {"type": "string"}, "profiles": _STRINGS,
                                "params": ANY_OBJECT, "unset": _STRINGS,
                                "hostname": {"type": "string"}}), errors=MACHINE_ERRORS)
PATHS.update({
    "/subnets/{ident}": {"delete": _op(
        "delete a subnet (by id or network)", _DELETED, params=[IDENT],
        errors=MACHINE_ERRORS)},
    "/reservations/{mac}": {"delete": _op(
        "delete a reservation", _DELETED, params=[{"name": "mac", "in": "path",
                                                   "required": True,
                                                   "schema": {"type": "string"}}],
        errors=MACHINE_ERRORS)},
    "/profiles/{name}": {
        "put": _op("create a profile or change its params",
                   {"200": _json(_PROFILE, "the profile")}, params=[PROFILE_NAME],
                   body=_body({"params": ANY_OBJECT, "unset": _STRINGS,
                               "description": {"type": "string"}})),
        "delete": _op("delete an unused profile", _DELETED, params=[PROFILE_NAME],
                      errors=(*COMMON, 404, 409))},
})


def document() -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {"title": "appliance", "version": "1",
                 "description": "Bare-metal provisioning appliance. Every call needs an API "
                                "token (appliance token create USER) or a web login."},
        "servers": [{"url": "/api/v1"}],
        "security": [{"bearer": []}],
        "components": {"schemas": SCHEMAS, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": PATHS,
    }


def serve() -> Response:
    return jsonify(document())
