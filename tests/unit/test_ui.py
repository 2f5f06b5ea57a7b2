"""The web UI through Flask's test client: login, CSRF, the list, a machine, and the
reimage form's confirmation and all-or-nothing submit. (A real headless Chromium drives
the same pages in tests/integration.)"""

from __future__ import annotations

import json
import re

import pytest

from appliance.auth import users
from appliance.lifecycle import record_seen
from appliance.models import Event, Machine
from appliance.web import create_app
from appliance.web.ui.access import safe_next
from tests.apiauth import PASSWORD
from tests.unit.test_provisioning import MAC, setup  # noqa: F401 - the fixture

MAC2 = "52:54:00:aa:bb:02"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOperatorKeyOperatorKeyOperatorKeyOper op@desk"


def _csrf(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, html
    return match.group(1)


@pytest.fixture
def ui(setup):  # type: ignore[no-untyped-def]  # noqa: F811
    config, db, catalog = setup
    with db.session() as session:
        users.add_user(session, "alice", PASSWORD, actor="t")
        record_seen(session, MAC2, "test", actor="test", arch="bios")
        for machine in session.query(Machine):
            machine.params = {"ssh_authorized_keys": [KEY]}
        session.query(Machine).filter_by(mac=MAC).one().hostname = "web1"
    app = create_app(config, db)
    app.config["SERVER_NAME"] = "appliance.test"
    return db, app.test_client()


def _log_in(client) -> None:  # type: ignore[no-untyped-def]
    page = client.get("/ui/login").text
    r = client.post("/ui/login", data={"name": "alice", "password": PASSWORD,
                                       "csrf_token": _csrf(page), "next": "/ui/machines"})
    assert r.status_code == 302 and r.headers["Location"].endswith("/ui/machines")


def test_pages_need_a_login_and_come_back_after_it(ui) -> None:  # type: ignore[no-untyped-def]
    _, client = ui
    r = client.get("/ui/machines?state=ready")
    assert r.status_code == 302 and "/ui/login?next=/ui/machines?state%3Dready" in \
        r.headers["Location"]
    page = client.get("/ui/login").text
    r = client.post("/ui/login", data={"name": "alice", "password": "wrong password!",
                                       "csrf_token": _csrf(page)})
    assert r.status_code == 401 and "wrong user name or password" in r.text
    r = client.post("/ui/login", data={"name": "alice", "password": PASSWORD})
    assert r.status_code == 403 and "CSRF" in r.text
    _log_in(client)
    assert client.get("/ui/machines").status_code == 200


@pytest.mark.parametrize("target, expected", [
    ("/ui/machines/web1", "/ui/machines/web1"), ("//evil.example/ui/", "/ui/machines"),
    ("https://evil.example/ui/x", "/ui/machines"), ("/api/v1/machines", "/ui/machines"),
    ("/ui\\@evil", "/ui/machines"), (None, "/ui/machines")])
def test_only_ui_paths_are_followed_after_login(ui, target, expected) -> None:  # type: ignore[no-untyped-def]
    _, client = ui
    with client.application.test_request_context():
        assert safe_next(target) == expected


def test_the_list_filters_and_the_machine_page_shows_no_secret(ui) -> None:  # type: ignore[no-untyped-def]
    db, client = ui
    with db.session() as session:
        session.query(Machine).filter_by(mac=MAC).one().install_token = "the-install-secret"
    _log_in(client)
    page = client.get("/ui/machines").text
    assert "web1" in page and MAC2 in page and "Machines <small>2</small>" in page
    page = client.get("/ui/machines?q=web").text
    assert "web1" in page and MAC2 not in page
    assert client.get("/ui/machines?state=bogus").status_code == 400
    page = client.get("/ui/machines/web1").text
    assert MAC in page and "the-install-secret" not in page
    assert client.get("/ui/machines/nope").status_code == 404


def test_reimage_needs_the_typed_name_and_the_csrf_token(ui) -> None:  # type: ignore[no-untyped-def]
    db, client = ui
    _log_in(client)
    form = client.get(f"/ui/reimage?m={MAC}").text
    assert "Type <strong>web1</strong> to confirm" in form
    data = {"m": MAC, "bootenv": "tiny", "confirm": "web2", "csrf_token": _csrf(form)}
    r = client.post("/ui/reimage", data=data)
    assert r.status_code == 400 and "confirm: type the machine&#39;s name, &#39;web1&#39;" in r.text
    r = client.post("/ui/reimage", data={**data, "confirm": "web1", "csrf_token": "forged"})
    assert r.status_code == 403
    with db.session() as session:
        assert session.query(Machine).filter_by(mac=MAC).one().state == "discovered"
    r = client.post("/ui/reimage", data={**data, "confirm": "web1", "reason": "from ui"})
    assert r.status_code == 302 and "/ui/progress?m=" in r.headers["Location"]
    with db.session() as session:
        machine = session.query(Machine).filter_by(mac=MAC).one()
        assert machine.state == "provisioning"
        event = session.query(Event).filter_by(kind="state").order_by(Event.id.desc()).first()
        assert event.actor == "user:alice" and "from ui" in event.message
    progress = client.get(r.headers["Location"]).text
    assert f'data-lifecycle="/api/v1/machines/{MAC}/lifecycle"' in progress
    # the page's own polling: the API with the login session's cookie, no token
    assert client.get(f"/api/v1/machines/{MAC}/lifecycle").json["state"] == "provisioning"


def test_bulk_reimage_confirms_the_count_and_is_all_or_nothing(ui) -> None:  # type: ignore[no-untyped-def]
    db, client = ui
    with db.session() as session:  # the second machine cannot render: no keys
        session.query(Machine).filter_by(mac=MAC2).one().params = {}
    _log_in(client)
    form = client.get(f"/ui/reimage?m={MAC}&m={MAC2}").text
    assert "Type <strong>2</strong> to confirm" in form
    data = {"m": [MAC, MAC2], "bootenv": "tiny", "confirm": "web1", "csrf_token": _csrf(form)}
    r = client.post("/ui/reimage", data=data)
    assert r.status_code == 400 and "number of machines" in r.text
    r = client.post("/ui/reimage", data={**data, "confirm": "2"})
    assert r.status_code == 400 and "ssh_authorized_keys" in r.text
    with db.session() as session:  # the first was not reimaged either
        assert {m.state for m in session.query(Machine)} == {"discovered"}
    r = client.post("/ui/reimage", data={**data, "confirm": "2",
                                         "params": "timezone=Europe/Paris\n"
                                                   f"ssh_authorized_keys={json.dumps([KEY])}"})
    assert r.status_code == 302, re.findall(r'role="alert"[^<]*', r.text)
    with db.session() as session:
        machines = session.query(Machine).all()
        assert {m.state for m in machines} == {"provisioning"}
        assert {m.params["timezone"] for m in machines} == {"Europe/Paris"}


def test_logout_needs_csrf_and_ends_the_session(ui) -> None:  # type: ignore[no-untyped-def]
    _, client = ui
    _log_in(client)
    page = client.get("/ui/machines").text
    assert client.post("/ui/logout").status_code == 403
    r = client.post("/ui/logout", data={"csrf_token": _csrf(page)})
    assert r.status_code == 302
    assert client.get("/ui/machines").status_code == 302
