"""The OpenAPI document matches the API: a valid OpenAPI 3.0 document, every route of
the api blueprint in it with the same methods (and nothing more), and real answers
valid against its schemas. (schemathesis fuzzes it against a running appliance in the
integration tier.)"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate

from appliance.config import Config
from appliance.db import Database
from appliance.lifecycle.events import record_event
from appliance.models import Machine
from appliance.web import create_app
from appliance.web.openapi import document
from tests.apiauth import authorize


@pytest.fixture
def client(tmp_path: Path):  # type: ignore[no-untyped-def]
    config = Config(state_dir=str(tmp_path))
    db = Database(config.effective_database_url)
    db.migrate()
    with db.session() as session:
        machine = Machine(mac="52:54:00:aa:00:01", hostname="n1")
        session.add(machine)
        session.flush()
        record_event(session, machine, "t", "registered", "hello", {"x": 1})
    app = create_app(config, db)
    c = app.test_client()
    authorize(c, db)
    return app, c


def test_the_document_is_valid_openapi() -> None:
    validate(document())


def test_every_api_route_is_documented_with_its_methods(client) -> None:  # type: ignore[no-untyped-def]
    app, _ = client
    routes: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/v1/") or rule.rule == "/api/v1/openapi.json":
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule.removeprefix("/api/v1"))
        routes.setdefault(path, set()).update(
            m.lower() for m in rule.methods - {"HEAD", "OPTIONS"})
    documented = {path: set(ops) for path, ops in document()["paths"].items()}
    assert routes == documented


def _check(answer: Any, schema_name: str) -> None:
    doc = document()
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": doc["components"]}
    OAS30Validator(schema).validate(answer)


def test_answers_match_their_schemas(client) -> None:  # type: ignore[no-untyped-def]
    _, c = client
    assert c.get("/api/v1/openapi.json", headers={"Authorization": ""}).json == document()
    _check(c.get("/api/v1/machines").json, "MachinePage")
    _check(c.get("/api/v1/machines/n1").json, "MachineDetail")
    _check(c.get("/api/v1/machines/n1/lifecycle").json, "Lifecycle")
    for event in c.get("/api/v1/events").json["items"]:
        _check(event, "Event")
    r = c.get("/api/v1/machines/none")
    assert r.status_code == 404
    _check(r.json, "Error")
    with pytest.raises(Exception, match="is not of type"):  # the check can fail
        _check({"items": "no", "total": 1, "limit": 1, "offset": 0, "states": {}},
               "MachinePage")


def test_the_document_needs_no_login(tmp_path: Path) -> None:
    config = Config(state_dir=str(tmp_path))
    db = Database(config.effective_database_url)
    db.migrate()
    c = create_app(config, db).test_client()
    assert c.get("/api/v1/openapi.json").status_code == 200
    assert c.get("/api/v1/machines").status_code == 401


def test_every_plain_get_answers_by_its_documented_schema(client) -> None:  # type: ignore[no-untyped-def]
    _, c = client
    doc = document()
    checked = []
    for path, ops in doc["paths"].items():
        if "{" in path or "get" not in ops:
            continue
        r = c.get(f"/api/v1{path}")
        assert r.status_code == 200, (path, r.json)
        schema = ops["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        OAS30Validator({**schema, "components": doc["components"]}).validate(r.json)
        checked.append(path)
    assert {"/machines", "/events", "/subnets", "/leases", "/bootenvs"} <= set(checked)


def test_api_errors_are_json_naming_the_field(client) -> None:  # type: ignore[no-untyped-def]
    _, c = client
    r = c.get("/api/v1/no-such-thing")
    assert r.status_code == 404 and r.json == {"error": "no such API path: /api/v1/no-such-thing"}
    r = c.delete("/api/v1/machines")
    assert r.status_code == 405 and "DELETE" in r.json["error"]
    assert "GET" in r.headers["Allow"]
    assert c.get("/no-such-page").content_type.startswith("text/html")  # not the API
    for path, body, field in [
            ("/api/v1/machines/n1/power", {"action": "on", "extra": 1}, "extra: unknown field"),
            ("/api/v1/machines/n1/boot", {"device": "pxe", "persistent": None},
             "persistent: expected bool, got NoneType"),
            ("/api/v1/machines/n1/identify", {"on": None}, "on: expected bool"),
            ("/api/v1/machines/n1/decommission", {"reason": None}, "reason: expected str")]:
        r = c.post(path, json=body)
        assert r.status_code == 400 and r.json["error"].startswith(field), (path, r.json)
    r = c.post("/api/v1/machines/n1/decommission", data="null",
               content_type="application/json")
    assert r.status_code == 400 and r.json["error"].startswith("body:")
    assert c.post("/api/v1/machines/n1/identify").status_code == 400  # no BMC, but no body is fine
    assert "BMC" in c.post("/api/v1/machines/n1/identify").json["error"]
    for query, field in [("all=maybe", "all:"), ("all=", "all:")]:
        r = c.get(f"/api/v1/leases?{query}")
        assert r.status_code == 400 and r.json["error"].startswith(field)
    for query in ("offset=", f"offset={2 ** 40}", "limit=0"):
        assert c.get(f"/api/v1/machines?{query}").status_code == 400, query
    assert c.get(f"/api/v1/power-requests/{2 ** 70}").status_code == 404
