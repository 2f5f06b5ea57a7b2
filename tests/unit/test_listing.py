"""Machine lists: filters, search, pages, address and last event (appliance/listing.py),
and the API and CLI that list through it."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from appliance import listing
from appliance.config import Config
from appliance.db import Database
from appliance.inventory import add_reservation, add_subnet
from appliance.lifecycle.events import record_event
from appliance.models import Lease, Machine, utcnow
from tests.apiauth import authorize


@pytest.fixture
def env(tmp_path: Path) -> tuple[Config, Database]:
    config = Config(state_dir=str(tmp_path))
    db = Database(config.effective_database_url)
    db.migrate()
    with db.session() as session:
        subnet = add_subnet(session, "10.9.0.0/16", pool="10.9.1.1-10.9.9.254")
        for i in range(120):
            machine = Machine(mac=f"52:54:00:00:{i // 256:02x}:{i % 256:02x}",
                              hostname=None if i >= 110 else f"node{i:03d}",
                              state="ready" if i % 3 == 0 else "available",
                              bootenv="local" if i % 3 == 0 else "discovery")
            session.add(machine)
        session.flush()
        m0 = session.query(Machine).filter_by(hostname="node000").one()
        record_event(session, m0, "t", "old", "first")
        record_event(session, m0, "t", "new", "second")
        session.add(Lease(ip="10.9.1.1", mac=m0.mac, subnet_id=subnet.id, state="bound",
                          expires_at=utcnow() + dt.timedelta(hours=1)))
        session.add(Lease(ip="10.9.1.2", mac="52:54:00:00:00:01", subnet_id=subnet.id,
                          state="bound", expires_at=utcnow() - dt.timedelta(hours=1)))
        add_reservation(session, "52:54:00:00:00:02", "10.9.0.2")
        session.query(Machine).filter_by(hostname="node005").one().hostname = "web_5"
    return config, db


def test_pages_filters_and_search(env) -> None:  # type: ignore[no-untyped-def]
    _, db = env
    with db.session() as session:
        page = listing.machine_page(session, listing.MachineFilter(limit=50))
        assert page["total"] == 120 and len(page["items"]) == 50
        assert page["states"]["ready"] == 40 and page["states"]["available"] == 80
        assert page["states"]["failed"] == 0
        names = [m["hostname"] for m in page["items"]]
        assert names[:3] == ["node000", "node001", "node002"]
        last = listing.machine_page(session, listing.MachineFilter(limit=50, offset=100))
        assert len(last["items"]) == 20 and last["items"][-1]["hostname"] is None
        ready = listing.machine_page(session, listing.MachineFilter(state="ready", limit=500))
        assert ready["total"] == 40 and {m["state"] for m in ready["items"]} == {"ready"}
        # "_" is a literal, not SQL's any-character
        found = listing.machine_page(session, listing.MachineFilter(q="web_"))
        assert [m["hostname"] for m in found["items"]] == ["web_5"]
        assert listing.machine_page(session, listing.MachineFilter(q="we__"))["total"] == 0
        by_mac = listing.machine_page(session, listing.MachineFilter(q="00:00:6E"))
        assert [m["mac"] for m in by_mac["items"]] == ["52:54:00:00:00:6e"]
        assert len(listing.all_machines(session)) == 120


def test_rows_carry_address_and_last_event(env) -> None:  # type: ignore[no-untyped-def]
    _, db = env
    with db.session() as session:
        rows = {m["mac"]: m for m in listing.all_machines(session, q="52:54:00:00:00:0")}
    assert rows["52:54:00:00:00:00"]["address"] == "10.9.1.1"
    assert rows["52:54:00:00:00:00"]["last_event"]["kind"] == "new"
    assert rows["52:54:00:00:00:01"]["address"] is None  # its lease expired
    assert rows["52:54:00:00:00:02"]["address"] == "10.9.0.2"  # reservation
    assert rows["52:54:00:00:00:03"]["last_event"] is None


@pytest.mark.parametrize("flt, message", [
    (listing.MachineFilter(state="happy"), "state: one of"),
    (listing.MachineFilter(limit=0), "limit: 1 to 500"),
    (listing.MachineFilter(limit=501), "limit: 1 to 500"),
    (listing.MachineFilter(offset=-1), "offset"),
    (listing.MachineFilter(q="x" * 65), "q: at most"),
])
def test_bad_filters_are_refused_by_field(flt: listing.MachineFilter, message: str) -> None:
    with pytest.raises(listing.ListingError, match=message):
        flt.check()


def test_the_api_lists_pages_and_shows_one_machine_without_credentials(env) -> None:  # type: ignore[no-untyped-def]
    from appliance.web import create_app

    config, db = env
    with db.session() as session:
        m = session.query(Machine).filter_by(hostname="node000").one()
        m.install_token, m.seed_token = "install-secret", "seed-secret"
    client = create_app(config, db).test_client()
    assert client.get("/api/v1/machines").status_code == 401
    authorize(client, db)
    r = client.get("/api/v1/machines?state=ready&limit=10&offset=10")
    assert r.status_code == 200 and r.json["total"] == 40 and len(r.json["items"]) == 10
    for query, field in (("limit=abc", "limit:"), ("state=bogus", "state:"),
                         ("limit=1000", "limit:"), ("offset=-5", "offset:")):
        r = client.get(f"/api/v1/machines?{query}")
        assert r.status_code == 400 and r.json["error"].startswith(field), (query, r.json)
    r = client.get("/api/v1/machines/node000")
    assert r.status_code == 200 and r.json["address"] == "10.9.1.1"
    assert [lease["ip"] for lease in r.json["leases"]] == ["10.9.1.1"]
    assert "secret" not in r.text
    assert client.get("/api/v1/machines/nothere").status_code == 404
    r = client.get("/api/v1/events?machine=node000&limit=1")
    assert [e["kind"] for e in r.json["items"]] == ["new"]
    assert client.get("/api/v1/events?limit=0").status_code == 400
    assert [s["network"] for s in client.get("/api/v1/subnets").json["items"]] == \
        ["10.9.0.0/16"]
    assert [r["ip"] for r in client.get("/api/v1/reservations").json["items"]] == ["10.9.0.2"]
    assert [x["ip"] for x in client.get("/api/v1/leases").json["items"]] == ["10.9.1.1"]
    assert len(client.get("/api/v1/leases?all=1").json["items"]) == 2
    bootenvs = {b["name"]: b for b in client.get("/api/v1/bootenvs").json["items"]}
    assert bootenvs["local"]["installs"] is False and bootenvs["debian-12"]["installs"]
    assert client.get("/api/v1/profiles").json["items"] == []


def test_the_cli_lists_through_the_same_function(env, capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    from appliance.cli import main

    config, _ = env
    path = tmp_path / "a.toml"
    path.write_text(f'state_dir = "{config.state_dir}"\n')
    assert main(["--config", str(path), "machines", "--state", "ready", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 40 and rows[0]["address"] == "10.9.1.1"
    assert main(["--config", str(path), "machines", "--search", "web_"]) == 0
    out = capsys.readouterr().out
    assert "web_5" in out and "node001" not in out
    assert main(["--config", str(path), "machines", "--state", "nope"]) == 2
