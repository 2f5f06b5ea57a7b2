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


def test_the_machine_page_draws_the_timeline_of_the_last_run(ui) -> None:  # type: ignore[no-untyped-def]
    import datetime as dt

    from appliance.inventory import add_subnet
    from appliance.lifecycle import record_event
    from appliance.models import Lease, utcnow

    db, client = ui
    _log_in(client)
    page = client.get(f"/ui/machines/{MAC}").text
    assert 'id="boot-timeline"' not in page and "No provisioning run yet" in page
    form = client.get(f"/ui/reimage?m={MAC}").text
    r = client.post("/ui/reimage", data={"m": MAC, "bootenv": "tiny", "confirm": "web1",
                                         "csrf_token": _csrf(form)})
    assert r.status_code == 302
    with db.session() as session:  # the machine got an address (the test client's)
        machine = session.query(Machine).filter_by(mac=MAC).one()
        record_event(session, machine, "dhcp", "dhcp", "ACK 127.0.0.1 (boot ipxe.efi)",
                     {"type": "ack"})
        subnet = add_subnet(session, "127.0.0.0/24", actor="test")
        session.flush()
        session.add(Lease(ip="127.0.0.1", mac=MAC, subnet_id=subnet.id, state="bound",
                          expires_at=utcnow() + dt.timedelta(hours=1)))
    assert "initrd --name initrd.gz" in client.get(f"/boot/{MAC}.ipxe").text
    # the kernel over HTTP: a download event, with the role taken from the bootenv
    assert client.get("/images/tiny/linux").data == b"x"
    assert client.get("/images/tiny/initrd.gz", headers={"Range": "bytes=0-0"}).status_code == 206
    assert client.get("/images/tiny/linux", headers={"Range": "bytes=1-"}).status_code in (206, 416)
    with db.session() as session:
        downloads = [(e.details["role"], e.details["path"]) for e in
                     session.query(Event).filter_by(kind="download").order_by(Event.id)]
    assert downloads == [("kernel", "tiny/linux"), ("initrd", "tiny/initrd.gz")]

    page = client.get(f"/ui/machines/{MAC}").text
    svg = page[page.index('<svg id="boot-timeline"'):page.index("</svg>")]
    statuses = dict(re.findall(r'data-phase="([a-z-]+)" data-status="([a-z]+)"', svg))
    assert statuses == {"power": "skipped", "dhcp": "done", "tftp": "skipped",
                        "script": "done", "kernel": "done", "installer": "running",
                        "reboot": "pending", "cloud-init": "pending",
                        "phone-home": "pending", "contract": "pending"}
    assert 'class="phase phase-running" data-phase="installer"' in svg
    fragment = client.get(f"/ui/machines/{MAC}/timeline")
    assert fragment.status_code == 200 and 'id="boot-timeline"' in fragment.text
    assert "data-refresh=" in fragment.text  # the page keeps polling while it runs
    api = client.get(f"/api/v1/machines/{MAC}/timeline").json
    assert api["outcome"] == "running" and api["bootenv"] == "tiny"
    assert [p["phase"] for p in api["phases"]][:3] == ["power", "dhcp", "tftp"]
    assert api["phases"][4]["detail"].startswith("initrd tiny/initrd.gz")


@pytest.mark.parametrize("path, shows", [
    ("/ui/subnets", "10.9.8.0/24"), ("/ui/reservations", "10.9.8.7"),
    ("/ui/leases", "active leases"), ("/ui/bootenvs", "tiny"), ("/ui/images", "tiny-kernel"),
    ("/ui/profiles", "rack-a")])
def test_the_inventory_pages_list_what_the_cli_lists(ui, path, shows) -> None:  # type: ignore[no-untyped-def]
    from appliance.inventory import add_reservation, add_subnet
    from appliance.profiles import set_profile
    from appliance.web import state

    db, client = ui
    assert client.get(path).status_code == 302  # a login first
    with db.session() as session:
        add_subnet(session, "10.9.8.0/24", pool="10.9.8.100-10.9.8.200", actor="test")
        session.flush()
        add_reservation(session, "52:54:00:01:02:03", "10.9.8.7", actor="test")
        with client.application.app_context():
            set_profile(session, state().catalog, "rack-a", {"timezone": "UTC"}, actor="test")
    _log_in(client)
    page = client.get(path)
    assert page.status_code == 200 and shows in page.text
    assert 'href="/ui/leases"' in page.text  # every page links every other


def test_power_buttons_queue_requests_and_destructive_ones_ask_first(ui) -> None:  # type: ignore[no-untyped-def]
    from appliance.models import PowerRequest
    from appliance.power import control
    from appliance.web import state

    db, client = ui
    _log_in(client)
    page = client.get(f"/ui/machines/{MAC}").text
    assert "No BMC: power this machine by hand" in page
    r = client.post(f"/ui/machines/{MAC}/power", data={"action": "on",
                                                       "csrf_token": _csrf(page)})
    assert r.status_code == 400 and "has no BMC" in r.text
    with db.session() as session, client.application.app_context():
        machine = session.query(Machine).filter_by(mac=MAC).one()
        control.set_bmc(state().config, session, machine, control.BmcSettings(
            driver="ipmi", address="127.0.0.1", username="admin", password="bmc-secret",
            port=6230), "test")
    page = client.get(f"/ui/machines/{MAC}").text
    assert "not polled yet" in page and "bmc-secret" not in page
    assert "No power part is running" in page  # no heartbeat in this database
    token = _csrf(page)

    r = client.post(f"/ui/machines/{MAC}/power", data={"action": "cycle", "csrf_token": token})
    assert r.status_code == 200 and "Yes, power cycle web1" in r.text
    with db.session() as session:
        assert session.query(PowerRequest).count() == 0   # asked, nothing queued yet
    r = client.post(f"/ui/machines/{MAC}/power",
                    data={"action": "cycle", "confirmed": "yes", "csrf_token": _csrf(r.text)})
    assert r.status_code == 302 and f"/ui/machines/{MAC}?queued=" in r.headers["Location"]
    r = client.post(f"/ui/machines/{MAC}/power", data={"action": "status", "csrf_token": token})
    assert r.status_code == 302   # reading the state needs no confirmation
    r = client.post(f"/ui/machines/{MAC}/boot",
                    data={"device": "pxe", "persistent": "on", "csrf_token": token})
    assert r.status_code == 302
    r = client.post(f"/ui/machines/{MAC}/identify", data={"on": "on", "csrf_token": token})
    assert r.status_code == 302
    with db.session() as session:
        got = [(q.operation, q.args, q.actor, q.state) for q in
               session.query(PowerRequest).order_by(PowerRequest.id)]
    assert got == [("power", {"action": "cycle"}, "user:alice", "queued"),
                   ("status", {}, "user:alice", "queued"),
                   ("boot", {"device": "pxe", "persistent": True, "mode": "bios"},
                    "user:alice", "queued"),
                   ("identify", {"on": True}, "user:alice", "queued")]
    page = client.get(r.headers["Location"]).text
    assert 'data-power-request="/api/v1/power-requests/4"' in page

    # refused: a bad value (named), no CSRF token, an unknown machine; nothing queued
    r = client.post(f"/ui/machines/{MAC}/power", data={"action": "explode", "csrf_token": token})
    assert r.status_code == 400 and "action: &#39;explode&#39; is not one of" in r.text
    r = client.post(f"/ui/machines/{MAC}/boot", data={"device": "floppy", "csrf_token": token})
    assert r.status_code == 400 and "device: &#39;floppy&#39;" in r.text
    r = client.post(f"/ui/machines/{MAC}/power", data={"action": "off", "confirmed": "yes"})
    assert r.status_code == 403
    r = client.post("/ui/machines/nope/power", data={"action": "on", "csrf_token": token})
    assert r.status_code == 404
    with db.session() as session:
        assert session.query(PowerRequest).count() == 4


def test_failed_logins_are_events_and_the_sixth_try_waits(ui) -> None:  # type: ignore[no-untyped-def]
    from appliance.auth import throttle

    db, client = ui
    token = _csrf(client.get("/ui/login").text)
    for _ in range(throttle.PER_CLIENT):
        r = client.post("/ui/login", data={"name": "alice", "password": "guess guess guess",
                                           "csrf_token": token})
        assert r.status_code == 401
    # now even the right password is not looked at
    r = client.post("/ui/login", data={"name": "alice", "password": PASSWORD,
                                       "csrf_token": token})
    assert r.status_code == 429 and "too many failed logins as &#39;alice&#39;" in r.text
    assert 1 <= int(r.headers["Retry-After"]) <= throttle.WINDOW + 1
    # another name is not held back by alice's failures
    r = client.post("/ui/login", data={"name": "bob", "password": "x" * 12,
                                       "csrf_token": token})
    assert r.status_code == 401
    with db.session() as session:
        failed = session.query(Event).filter_by(kind="login-failed").all()
        assert len(failed) == throttle.PER_CLIENT + 1
        assert {e.details["name"] for e in failed} == {"alice", "bob"}
        assert all(PASSWORD not in e.message and "guess" not in e.message for e in failed)
        # the window passes: alice may try again
        later = max(e.at for e in failed) + __import__("datetime").timedelta(
            seconds=throttle.WINDOW + 1)
        assert throttle.retry_after(session, "alice", "127.0.0.1", now=later) == 0
        assert throttle.retry_after(session, "alice", "127.0.0.1") > 0
