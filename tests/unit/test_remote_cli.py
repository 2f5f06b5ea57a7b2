"""The CLI over the JSON API (``--endpoint``): the same tables and JSON as the local CLI,
writes recorded with the token's user, clear failures and never a local fallback; and
the API's write routes themselves."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from appliance.auth import tokens
from appliance.cli import main
from appliance.config import Config
from appliance.db import Database
from appliance.models import ApiToken, Event, Machine, Reservation, Subnet
from appliance.web import create_app
from tests.apiauth import api_token


@dataclass
class Box:
    url: str
    token: str
    config_path: Path
    db: Database
    app: object

    def remote(self, *argv: str) -> list[str]:
        return ["--endpoint", self.url, "--token", self.token, *argv]

    def local(self, *argv: str) -> list[str]:
        return ["--config", str(self.config_path), *argv]


@pytest.fixture
def box(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Box]:
    monkeypatch.delenv("APPLIANCE_ENDPOINT", raising=False)
    monkeypatch.delenv("APPLIANCE_TOKEN", raising=False)
    config = Config(state_dir=str(tmp_path / "state"))
    db = Database(config.effective_database_url)
    db.migrate()
    with db.session() as session:
        session.add(Machine(mac="52:54:00:aa:00:01", hostname="n1"))
    path = tmp_path / "a.toml"
    path.write_text(f'state_dir = "{config.state_dir}"\n')
    app = create_app(config, db)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Box(f"http://127.0.0.1:{server.server_port}", api_token(db, "alice"), path,
                  db, app)
    finally:
        server.shutdown()
        thread.join(5)


def _out(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 0) -> str:
    assert main(argv) == code
    return capsys.readouterr().out


LISTS = [["machines"], ["leases", "--all"], ["subnet", "list"], ["reservation", "list"],
         ["profile", "list"], ["machine", "timeline", "n1"]]


def test_tables_and_json_are_the_local_ones(box: Box, capsys: pytest.CaptureFixture[str]
                                            ) -> None:
    assert main(box.local("subnet", "add", "10.1.0.0/24", "--pool",
                          "10.1.0.100-10.1.0.200")) == 0
    assert main(box.local("reservation", "add", "52:54:00:aa:00:01", "10.1.0.5")) == 0
    assert main(box.local("profile", "set", "site", "--param", "timezone=UTC")) == 0
    capsys.readouterr()
    for argv in LISTS:
        assert _out(capsys, box.remote(*argv)) == _out(capsys, box.local(*argv)), argv
        local = json.loads(_out(capsys, box.local(*argv, "--json")))
        assert json.loads(_out(capsys, box.remote("--json", *argv))) == local, argv
        assert json.loads(_out(capsys, box.remote(*argv, "--json"))) == local, argv
    shown = _out(capsys, box.remote("machine", "show", "n1"))
    assert "mac:                   52:54:00:aa:00:01" in shown.splitlines()
    assert json.loads(_out(capsys, box.remote("machine", "show", "n1", "--json")))[
        "address"] == "10.1.0.5"
    remote_events = json.loads(_out(capsys, box.remote("--json", "events")))
    assert remote_events == json.loads(_out(capsys, box.local("events", "--json")))
    assert "subnet-added" in _out(capsys, box.remote("events"))


def test_remote_writes_change_the_database_as_the_user(
        box: Box, capsys: pytest.CaptureFixture[str]) -> None:
    _out(capsys, box.remote("subnet", "add", "10.2.0.0/24", "--router", "10.2.0.1"))
    _out(capsys, box.remote("reservation", "add", "52:54:00:aa:00:09", "10.2.0.9",
                            "--hostname", "r9"))
    out = _out(capsys, box.remote("machine", "set", "n1", "--hostname", "n1b"))
    assert "updated" in out
    with box.db.session() as session:
        assert session.query(Subnet).filter_by(network="10.2.0.0/24").one()
        assert session.query(Reservation).filter_by(ip="10.2.0.9").one().hostname == "r9"
        assert session.query(Machine).one().hostname == "n1b"
        kinds = {(e.kind, e.actor) for e in session.query(Event)}
    for kind in ("subnet-added", "reservation-added", "machine-configured"):
        assert (kind, "user:alice") in kinds
    _out(capsys, box.remote("reservation", "delete", "52:54:00:aa:00:09"))
    _out(capsys, box.remote("subnet", "delete", "10.2.0.0/24"))
    with box.db.session() as session:
        assert session.query(Subnet).count() == 0


def test_a_bad_field_prints_the_servers_message(box: Box,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(box.remote("subnet", "add", "10.3.0.0/33")) == 1
    err = capsys.readouterr().err
    assert "400" in err and "network" in err
    assert main(box.remote("machine", "show", "nosuch")) == 1
    assert "404" in capsys.readouterr().err


def test_a_wrong_or_revoked_token_is_refused(box: Box,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    box.token = "not-a-token"
    assert main(box.remote("machines")) == 1
    assert "401" in capsys.readouterr().err
    box.token = api_token(box.db, "bob")
    assert main(box.remote("machines")) == 0
    with box.db.session() as session:
        row = session.query(ApiToken).order_by(ApiToken.id.desc()).first()
        tokens.revoke_token(session, row.id, actor="test")
    capsys.readouterr()
    assert main(box.remote("machines")) == 1
    assert "401" in capsys.readouterr().err


def test_an_unreachable_endpoint_fails_without_touching_anything_local(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    local = tmp_path / "local"
    config = tmp_path / "local.toml"
    config.write_text(f'state_dir = "{local}"\n')
    monkeypatch.setenv("APPLIANCE_CONFIG", str(config))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("APPLIANCE_ENDPOINT", url)
    monkeypatch.setenv("APPLIANCE_TOKEN", "x")
    for argv in (["machines"], ["subnet", "add", "10.0.0.0/24"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert url in err and "connection refused" in err
    assert not local.exists()


def test_token_file_and_local_only_verbs(box: Box, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(box.token + "\n")
    assert main(["--endpoint", box.url, "--token-file", str(token_file), "machines"]) == 0
    assert "n1" in capsys.readouterr().out
    for argv in (["db", "current"], ["token", "list"], ["counters"], ["logs", "n1"],
                 ["render", "n1", "boot.ipxe"], ["user", "list"], ["serve"]):
        assert main(box.remote(*argv)) == 2
        assert "runs on the appliance itself; it has no remote form" in \
            capsys.readouterr().err
    assert main(["--endpoint", box.url, "machines"]) == 2
    assert "no API token" in capsys.readouterr().err


def test_a_token_without_an_endpoint_runs_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    local = tmp_path / "local"
    config = tmp_path / "local.toml"
    config.write_text(f'state_dir = "{local}"\n')
    monkeypatch.setenv("APPLIANCE_CONFIG", str(config))
    monkeypatch.delenv("APPLIANCE_ENDPOINT", raising=False)
    assert main(["--token", "apl_x", "machines"]) == 2
    assert "need --endpoint" in capsys.readouterr().err
    assert not local.exists()


# ---- the write routes -----------------------------------------------------------------

@pytest.fixture
def api(box: Box):  # type: ignore[no-untyped-def]
    c = box.app.test_client()  # type: ignore[attr-defined]
    c.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {box.token}"
    return c


def test_write_routes_need_a_token(box: Box) -> None:
    c = box.app.test_client()  # type: ignore[attr-defined]
    assert c.post("/api/v1/subnets", json={"network": "10.0.0.0/24"}).status_code == 401
    assert c.patch("/api/v1/machines/n1", json={}).status_code == 401
    assert c.delete("/api/v1/profiles/x").status_code == 401


def test_write_routes_name_the_bad_field(api) -> None:  # type: ignore[no-untyped-def]
    cases = [("post", "/api/v1/subnets", {"network": "nope"}, "network"),
             ("post", "/api/v1/subnets", {"network": "10.0.0.0/24", "lease_seconds": "x"},
              "lease_seconds"),
             ("post", "/api/v1/subnets", {"network": "10.0.0.0/24", "color": 1}, "color"),
             ("post", "/api/v1/reservations", {"mac": "zz", "ip": "10.0.0.1"}, "mac"),
             ("post", "/api/v1/reservations", {"mac": "52:54:00:aa:00:02"}, "ip"),
             ("post", "/api/v1/machines", {"mac": "bad"}, "mac"),
             ("patch", "/api/v1/machines/n1", {"profiles": [1]}, "profiles"),
             ("patch", "/api/v1/machines/n1", {"bootenv": "nope"}, "bootenv"),
             ("put", "/api/v1/profiles/p1", {"params": []}, "params"),
             ("put", "/api/v1/profiles/bad name", {}, "profile name")]
    for method, path, body, field in cases:
        answer = getattr(api, method)(path, json=body)
        assert answer.status_code == 400, (path, body, answer.json)
        assert field in answer.json["error"], (path, body, answer.json)


def test_write_routes_404_for_unknown_things(api) -> None:  # type: ignore[no-untyped-def]
    assert api.delete("/api/v1/subnets/10.9.0.0/24").status_code == 404
    assert api.delete("/api/v1/subnets/77").status_code == 404
    assert api.delete("/api/v1/reservations/52:54:00:aa:00:77").status_code == 404
    assert api.patch("/api/v1/machines/nosuch", json={}).status_code == 404
    assert api.delete("/api/v1/profiles/nosuch").status_code == 404


def test_write_routes_round_trip(api) -> None:  # type: ignore[no-untyped-def]
    added = api.post("/api/v1/subnets", json={"network": "10.5.0.0/24", "dns": ["1.1.1.1"]})
    assert added.status_code == 201
    assert api.delete(f"/api/v1/subnets/{added.json['id']}").json == {
        "deleted": "10.5.0.0/24"}
    machine = api.post("/api/v1/machines", json={"mac": "52:54:00:aa:00:03",
                                                 "hostname": "n3"})
    assert machine.status_code == 201 and machine.json["hostname"] == "n3"
    assert api.post("/api/v1/machines", json={"mac": "52:54:00:aa:00:03"}).status_code == 400
    profile = api.put("/api/v1/profiles/site", json={"description": "d"})
    assert profile.json == {"name": "site", "description": "d", "params": {}}
    assert api.patch("/api/v1/machines/n3", json={"profiles": ["site"]}).json[
        "profiles"] == ["site"]
    assert api.delete("/api/v1/profiles/site").status_code == 409
    assert api.patch("/api/v1/machines/n3", json={"profiles": []}).status_code == 200
    assert api.delete("/api/v1/profiles/site").json == {"deleted": "site"}
