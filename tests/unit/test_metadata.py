"""The metadata service (appliance/web/metadata.py): EC2 listings and leaves, who is who
by address and by seed token, IMDSv2 tokens, the NoCloud seed, phone-home, and what an
attacker on the provisioning network gets (404/401/403, never another machine's data).

Real peers (a DHCP lease, curl from that address) are in
tests/integration/test_metadata.py.
"""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from flask.testing import FlaskClient
from sqlalchemy import select

from appliance.catalog import load_catalog
from appliance.config import Config
from appliance.db import Database
from appliance.lifecycle import record_seen
from appliance.lifecycle.operations import new_instance_id
from appliance.machinefiles import BootTarget, render_machine_file
from appliance.models import Event, Lease, Machine, Reservation, Subnet, utcnow
from appliance.profiles import configure_machine, set_profile
from appliance.web import create_app, imds_token, unknown
from appliance.web import metadata as metadata_module

pytestmark = pytest.mark.unit

BASE = "http://10.0.0.1:8080"
OPERATOR = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOperatorKeyOperatorKeyOperatorKeyOper op@desk"
SECOND = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQSecondKeySecondKey backup key"
B_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMachineBMachineBMachineBMachineBMach b@only"
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostKeyHostKeyHostKeyHostKeyHostKeyHostK root@a"
DEPLOY = {"image": "os/x.raw", "image_sha256": "0" * 64}

A_MAC, A_IP = "52:54:00:0d:00:01", "10.0.0.101"  # by its lease
B_MAC, B_IP = "52:54:00:0d:00:02", "10.0.0.42"   # by its reservation
C_MAC, C_IP = "52:54:00:0d:00:03", "10.0.0.103"  # leased, no deployment
E_MAC, E_IP, E_RESERVED = "52:54:00:0d:00:05", "10.0.0.105", "10.0.0.43"  # leased elsewhere
NOBODY = "10.0.0.200"
RELEASED = "10.0.0.150"  # a released lease of B's MAC

EC2_INDEX = ["ami-id", "ami-launch-index", "hostname", "instance-id", "instance-type",
             "local-hostname", "local-ipv4", "mac", "placement/", "public-keys/",
             "reservation-id", "security-groups"]


@dataclass
class Env:
    config: Config
    db: Database
    client: FlaskClient

    def machine(self, session: Any, mac: str) -> Machine:
        return session.scalar(select(Machine).where(Machine.mac == mac))

    def info(self, mac: str) -> dict[str, Any]:
        with self.db.session() as s:
            m = self.machine(s, mac)
            return {"instance_id": m.instance_id, "seed_token": m.seed_token, "id": m.id,
                    "state": m.state, "phase": m.phase, "ssh_host_keys": m.ssh_host_keys}

    def events(self, kind: str | None = None) -> list[Event]:
        with self.db.session() as s:
            rows = list(s.scalars(select(Event).order_by(Event.id)))
            s.expunge_all()
        return [e for e in rows if kind is None or e.kind == kind]

    def get(self, path: str, ip: str, **kw: Any):  # type: ignore[no-untyped-def]
        return self.client.get(path, base_url=BASE, environ_base={"REMOTE_ADDR": ip}, **kw)

    def put_token(self, ip: str, ttl: str | None = "60", **headers: str):  # type: ignore[no-untyped-def]
        if ttl is not None:
            headers["X-aws-ec2-metadata-token-ttl-seconds"] = ttl
        return self.client.put("/latest/api/token", base_url=BASE, headers=headers,
                               environ_base={"REMOTE_ADDR": ip})


def deploy(session: Any, machine: Machine, number: int = 1) -> None:
    """What a reimage and a finished install leave behind (installing/first-boot)."""
    machine.instance_id = new_instance_id()
    machine.deployment = {"number": number, "bootenv": "image-deploy", "values": DEPLOY,
                          "actor": "test", "instance_id": machine.instance_id}
    machine.bootenv = "local"
    machine.install_token = None
    machine.state, machine.phase = "installing", "first-boot"


@pytest.fixture
def env(tmp_path: Path) -> Env:
    unknown.reset()
    config = Config(state_dir=str(tmp_path / "state"))
    db = Database(config.effective_database_url)
    db.migrate()
    catalog = load_catalog(config)
    assert catalog.errors == []
    later = utcnow() + dt.timedelta(hours=1)
    with db.session() as s:
        set_profile(s, catalog, "global", {"ssh_authorized_keys": [OPERATOR, SECOND]})
        subnet = Subnet(network="10.0.0.0/24", pool_start="10.0.0.100", pool_end="10.0.0.199")
        s.add(subnet)
        s.flush()
        for mac, name, values in ((A_MAC, "a.lab.example", {}),
                                  (B_MAC, "b", {"ssh_authorized_keys": [B_KEY]}),
                                  (C_MAC, "c", {}), (E_MAC, "e", {})):
            m = record_seen(s, mac, "test", actor="test", arch="bios")
            configure_machine(s, catalog, m, bootenv="image-deploy", hostname=name,
                              values={**DEPLOY, **values})
            if mac != C_MAC:
                deploy(s, m)
        for ip, mac, state in ((A_IP, A_MAC, "bound"), (C_IP, C_MAC, "bound"),
                               (E_IP, E_MAC, "bound"), (RELEASED, B_MAC, "released")):
            s.add(Lease(ip=ip, mac=mac, subnet_id=subnet.id, state=state, expires_at=later))
        s.add(Reservation(mac=B_MAC, ip=B_IP, hostname="b", subnet_id=subnet.id))
        s.add(Reservation(mac=E_MAC, ip=E_RESERVED, hostname="e", subnet_id=subnet.id))
    return Env(config, db, create_app(config, db).test_client())


# ---- EC2 listings and leaves ------------------------------------------------------------

def test_every_listing_and_leaf(env: Env) -> None:
    a = env.info(A_MAC)
    root = env.get("/", A_IP)
    assert root.status_code == 200 and root.mimetype == "text/plain"
    assert root.text.splitlines() == ["2009-04-04", "2021-03-23", "latest"]
    for path in ("/latest", "/latest/", "/2021-03-23/"):
        assert env.get(path, A_IP).text == "meta-data\nuser-data"
    for path in ("/2021-03-23/meta-data/", "/latest/meta-data", "/2009-04-04/meta-data/"):
        got = env.get(path, A_IP)
        assert got.status_code == 200 and got.mimetype == "text/plain"
        assert got.text.split("\n") == EC2_INDEX
        assert got.headers["Cache-Control"] == "no-store"
    leaves = {
        "instance-id": a["instance_id"], "hostname": "a.lab.example",
        "local-hostname": "a.lab.example", "local-ipv4": A_IP, "mac": A_MAC,
        "ami-id": "ami-image-deploy", "ami-launch-index": "0", "instance-type": "bare-metal",
        "reservation-id": "r-" + a["instance_id"][2:], "security-groups": "default",
        "placement/": "availability-zone", "placement": "availability-zone",
        "placement/availability-zone": "appliance",
        "public-keys/": "0=op@desk\n1=backup-key", "public-keys": "0=op@desk\n1=backup-key",
        "public-keys/0/": "openssh-key", "public-keys/0": "openssh-key",
        "public-keys/0/openssh-key": OPERATOR, "public-keys/1/openssh-key": SECOND,
    }
    for version in ("2009-04-04", "2021-03-23", "latest"):
        for leaf, value in leaves.items():
            got = env.get(f"/{version}/meta-data/{leaf}", A_IP)
            assert (got.status_code, got.text) == (200, value), (version, leaf)
            assert got.mimetype == "text/plain"
    # Unknown leaves of a known machine: 404, no event. Odd versions: no route at all.
    for path in ("/latest/meta-data/nope", "/latest/meta-data/public-keys/2/openssh-key",
                 "/latest/meta-data/public-keys/0/openssh-key/x",
                 "/latest/meta-data/../user-data",
                 "/latest/meta-data/placement/../instance-id",
                 "/latest/meta-data/instance-id/x", "/latest/dynamic/instance-identity/document",
                 "/1.0/meta-data/instance-id", "/2021-3-23/meta-data/instance-id",
                 "/..%2flatest/meta-data/instance-id", "/latest/meta-data%2f..%2fuser-data",
                 "/latest/api/token"):
        got = env.get(path, A_IP)
        assert got.status_code in (404, 405), path
        assert a["instance_id"] not in got.text and OPERATOR not in got.text
    assert env.events("metadata-unknown") == []
    # Werkzeug merges slashes by redirecting (to the same machine's own data).
    got = env.get("/latest/meta-data//instance-id", A_IP)
    assert got.status_code == 308 and got.location.endswith("/latest/meta-data/instance-id")


def test_duplicate_and_missing_key_names_stay_unique(env: Env) -> None:
    with env.db.session() as s:
        m = env.machine(s, A_MAC)
        m.params = {**m.params, "ssh_authorized_keys": [
            "ssh-ed25519 AAAA one", "ssh-ed25519 BBBB one", "ssh-ed25519 CCCC",
            "ssh-ed25519 DDDD we/ird\tname=x"]}
    got = env.get("/latest/meta-data/public-keys/", A_IP).text
    assert got.split("\n") == ["0=one", "1=one-1", "2=key-2", "3=we-ird-name-x"]
    assert env.get("/latest/meta-data/public-keys/3/openssh-key", A_IP).text == \
        "ssh-ed25519 DDDD we/ird name=x"


def test_a_reservation_address_identifies_its_machine(env: Env) -> None:
    b = env.info(B_MAC)
    assert env.get("/latest/meta-data/instance-id", B_IP).text == b["instance_id"]
    assert env.get("/latest/meta-data/local-ipv4", B_IP).text == B_IP
    assert env.get("/latest/meta-data/mac", B_IP).text == B_MAC
    assert env.get("/latest/meta-data/public-keys/", B_IP).text == "0=b@only"
    assert env.get("/latest/meta-data/public-keys/0/openssh-key", B_IP).text == B_KEY


def test_an_address_gets_only_its_own_machines_data(env: Env) -> None:
    a, b = env.info(A_MAC), env.info(B_MAC)
    a_view = "".join(env.get(f"/latest/meta-data/{p}", A_IP).text for p in
                     ("instance-id", "mac", "public-keys/0/openssh-key",
                      "public-keys/1/openssh-key", "hostname"))
    a_view += env.get("/latest/user-data", A_IP).text
    b_view = "".join(env.get(f"/latest/meta-data/{p}", B_IP).text for p in
                     ("instance-id", "mac", "public-keys/0/openssh-key", "hostname"))
    b_view += env.get("/latest/user-data", B_IP).text
    assert a["instance_id"] in a_view and b["instance_id"] not in a_view
    assert B_KEY not in a_view and b["seed_token"] not in a_view
    assert b["instance_id"] in b_view and a["instance_id"] not in b_view
    assert OPERATOR not in b_view and a["seed_token"] not in b_view and A_MAC not in b_view


@pytest.mark.parametrize("address", [NOBODY, RELEASED, E_RESERVED, "not-an-address", ""])
def test_an_address_of_no_machine_gets_404_and_one_event(env: Env, address: str) -> None:
    """No lease, a released lease, a reserved address whose machine holds a current lease
    elsewhere (someone else uses it), nonsense."""
    for path in ("/latest/meta-data/", "/latest/meta-data/instance-id", "/latest/user-data",
                 "/2021-03-23/meta-data/public-keys/0/openssh-key"):
        got = env.get(path, address)
        assert got.status_code == 404, path
        assert "i-" not in got.text and "ssh-" not in got.text
    assert env.put_token(address).status_code == 404
    events = env.events("metadata-unknown")
    assert len(events) == 1  # one per client per minute
    assert events[0].machine_id is None and events[0].details["client"] == address
    # the machine E itself, at its leased address, is served
    assert env.get("/latest/meta-data/mac", E_IP).text == E_MAC


def test_an_expired_lease_identifies_nobody(env: Env) -> None:
    with env.db.session() as s:
        s.scalar(select(Lease).where(Lease.ip == A_IP)).expires_at = \
            utcnow() - dt.timedelta(seconds=1)
    assert env.get("/latest/meta-data/instance-id", A_IP).status_code == 404


def test_a_machine_without_a_deployment_gets_404(env: Env) -> None:
    got = env.get("/latest/meta-data/instance-id", C_IP)
    assert got.status_code == 404
    assert env.get("/latest/user-data", C_IP).status_code == 404
    events = env.events("metadata-unknown")
    assert len(events) == 1 and events[0].machine_id == env.info(C_MAC)["id"]
    assert "no deployment" in events[0].message


# ---- user-data ----------------------------------------------------------------------------

def test_user_data_phones_home_and_is_the_same_on_both_paths(env: Env, tmp_path: Path) -> None:
    a = env.info(A_MAC)
    ec2 = env.get("/latest/user-data", A_IP)
    assert ec2.status_code == 200 and ec2.mimetype == "text/plain"
    nocloud = env.get(f"/nocloud/{a['seed_token']}/user-data", "10.9.9.9")
    assert nocloud.text == ec2.text
    assert env.get("/2021-03-23/user-data", A_IP).text == ec2.text
    assert ec2.text.startswith("#cloud-config\n")
    data = yaml.safe_load(ec2.text)
    assert data["phone_home"] == {"url": f"{BASE}/phone-home/{a['seed_token']}",
                                  "post": "all", "tries": 10}
    assert data["ssh_authorized_keys"] == [OPERATOR, SECOND]
    assert data["hostname"] == "a" and data["fqdn"] == "a.lab.example"
    assert data["ssh_pwauth"] is False
    served = env.events("user-data")
    assert [e.details["source"] for e in served] == ["ec2", "nocloud", "ec2"]
    cloud_init = shutil.which("cloud-init")
    if cloud_init:  # Debian's cloud-init: the schema check the integration tests use
        path = tmp_path / "user-data"
        path.write_text(ec2.text)
        out = subprocess.run([cloud_init, "schema", "-c", str(path)], capture_output=True,
                             text=True, timeout=120)
        output = out.stdout + out.stderr
        assert out.returncode == 0 and "Valid cloud-config" in output, output
        assert "deprecat" not in output.lower(), output


@pytest.mark.parametrize("bootenv", ["debian-12", "ubuntu-24.04", "rocky-9", "alma-9"])
def test_every_installer_deployment_gets_a_seed(env: Env, bootenv: str) -> None:
    """The installers point the installed OS's cloud-init at seed_url: it must render
    with each one's params."""
    with env.db.session() as s:
        m = env.machine(s, A_MAC)
        m.deployment = {**m.deployment, "bootenv": bootenv}
    a = env.info(A_MAC)
    got = env.get(f"/nocloud/{a['seed_token']}/user-data", A_IP)
    assert got.status_code == 200, got.text
    data = yaml.safe_load(got.text)
    assert data["phone_home"]["url"].endswith(f"/phone-home/{a['seed_token']}")
    assert env.get("/latest/meta-data/ami-id", A_IP).text == \
        "ami-" + bootenv.replace(".", "-")


def test_image_deploy_install_user_data_phones_home_too(tmp_path: Path) -> None:
    """The same template under the install URL (bootenv image-deploy, mid-install)."""
    config = Config(state_dir=str(tmp_path / "state"))
    db = Database(config.effective_database_url)
    db.migrate()
    catalog = load_catalog(config)
    target = BootTarget(base_url=BASE, server="10.0.0.1")
    with db.session() as s:
        set_profile(s, catalog, "global", {"ssh_authorized_keys": [OPERATOR]})
        m = record_seen(s, A_MAC, "test", actor="test", arch="bios")
        configure_machine(s, catalog, m, bootenv="image-deploy", values=DEPLOY)
        text = render_machine_file(config, s, catalog, m, "user-data", target)
        assert yaml.safe_load(text)["phone_home"]["url"] == \
            f"{BASE}/phone-home/{m.seed_token}"
        m.seed_token = None
        assert "phone_home" not in render_machine_file(config, s, catalog, m, "user-data",
                                                       target)


def test_a_deployment_whose_bootenv_is_gone_is_a_500_and_one_event(env: Env) -> None:
    with env.db.session() as s:
        m = env.machine(s, A_MAC)
        m.deployment = {**m.deployment, "bootenv": "retired-os"}
    for path in ("/latest/user-data", "/latest/meta-data/instance-id", "/latest/meta-data/"):
        got = env.get(path, A_IP)
        assert got.status_code == 500 and "'retired-os' is no longer defined" in got.text
    assert env.get(f"/nocloud/{env.info(A_MAC)['seed_token']}/meta-data", A_IP
                   ).status_code == 500
    events = env.events("metadata-error")
    assert len(events) == 1 and events[0].machine_id == env.info(A_MAC)["id"]


# ---- IMDSv2 -------------------------------------------------------------------------------

def test_token_roundtrip_and_ttl_bounds(env: Env) -> None:
    got = env.put_token(A_IP, "21600")
    assert got.status_code == 200 and got.mimetype == "text/plain"
    assert got.headers["X-aws-ec2-metadata-token-ttl-seconds"] == "21600"
    token = got.text
    assert token.startswith("v1.") and len(token) < 200
    read = env.get("/latest/meta-data/instance-id", A_IP,
                   headers={"X-aws-ec2-metadata-token": token})
    assert (read.status_code, read.text) == (200, env.info(A_MAC)["instance_id"])
    assert env.get("/latest/user-data", A_IP,
                   headers={"X-aws-ec2-metadata-token": token}).status_code == 200
    assert env.put_token(A_IP, "1").status_code == 200
    for bad in (None, "", "0", "21601", "-1", "abc", "1.5", "1_0", "99999999999"):
        refused = env.put_token(A_IP, bad)
        assert refused.status_code == 400, bad
        assert "X-aws-ec2-metadata-token-ttl-seconds" in refused.text
    env.config.lifecycle.imds_token_max_ttl = 60
    assert env.put_token(A_IP, "61").status_code == 400
    assert env.put_token(A_IP, "60").status_code == 200
    assert env.client.get("/latest/api/token", base_url=BASE,
                          environ_base={"REMOTE_ADDR": A_IP}).status_code == 405


def test_an_expired_token_is_refused(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    token = env.put_token(A_IP, "5").text
    start = imds_token.now()
    headers = {"X-aws-ec2-metadata-token": token}
    monkeypatch.setattr(imds_token, "now", lambda: start + 4.5)
    assert env.get("/latest/meta-data/instance-id", A_IP, headers=headers).status_code == 200
    monkeypatch.setattr(imds_token, "now", lambda: start + 5.01)
    got = env.get("/latest/meta-data/instance-id", A_IP, headers=headers)
    assert (got.status_code, got.text) == (401, "token expired\n")
    assert env.events("imds-token-refused") == []  # merely old: no event


def test_a_token_from_another_address_is_refused_with_an_event(env: Env) -> None:
    token = env.put_token(A_IP).text
    headers = {"X-aws-ec2-metadata-token": token}
    for ip in (B_IP, NOBODY):
        got = env.get("/latest/meta-data/instance-id", ip, headers=headers)
        assert (got.status_code, got.text) == (401, "token issued to another address\n")
        got = env.get("/latest/user-data", ip, headers=headers)
        assert got.status_code == 401 and "ssh-" not in got.text
    events = env.events("imds-token-refused")
    assert [(e.machine_id, e.details["client"]) for e in events] == [
        (env.info(A_MAC)["id"], B_IP), (env.info(A_MAC)["id"], NOBODY)]


def test_a_token_of_an_earlier_deployment_is_refused(env: Env) -> None:
    token = env.put_token(A_IP).text
    with env.db.session() as s:
        m = env.machine(s, A_MAC)
        deploy(s, m, number=2)
    got = env.get("/latest/meta-data/instance-id", A_IP,
                  headers={"X-aws-ec2-metadata-token": token})
    assert (got.status_code, got.text) == (401, "token issued for an earlier deployment\n")


def test_a_token_of_the_machine_that_had_the_address_before_is_refused(env: Env) -> None:
    token = env.put_token(A_IP).text
    with env.db.session() as s:  # A's lease is over; E got the address
        s.scalar(select(Lease).where(Lease.ip == A_IP)).mac = E_MAC
        s.scalar(select(Lease).where(Lease.ip == E_IP)).state = "released"
    got = env.get("/latest/meta-data/instance-id", A_IP,
                  headers={"X-aws-ec2-metadata-token": token})
    assert (got.status_code, got.text) == (401, "token issued to another machine\n")
    assert len(env.events("imds-token-refused")) == 1
    assert env.get("/latest/meta-data/mac", A_IP).text == E_MAC


def test_forged_and_malformed_tokens(env: Env) -> None:
    token = env.put_token(A_IP).text
    version, body, signature = token.split(".")
    other_key = imds_token.issue(b"k" * 32, machine_id=env.info(B_MAC)["id"], address=A_IP,
                                 instance_id=env.info(B_MAC)["instance_id"], ttl=60)
    claims = imds_token._b64(f"9999999999999|{env.info(B_MAC)['id']}|{A_IP}|x".encode())
    for forged in (other_key, f"{version}.{claims}.{signature}",
                   f"{version}.{body}.{signature[:-2]}AA"):
        got = env.get("/latest/meta-data/instance-id", A_IP,
                      headers={"X-aws-ec2-metadata-token": forged})
        assert (got.status_code, got.text) == (401, "bad token signature\n")
    assert len(env.events("imds-token-refused")) == 1  # rate-limited per client
    for malformed in ("", "x", "v2.a.b", "v1..", "v1.!!.??", "v1." + "a" * 600 + ".b"):
        got = env.get("/latest/meta-data/instance-id", A_IP,
                      headers={"X-aws-ec2-metadata-token": malformed})
        assert (got.status_code, got.text) == (401, "malformed token\n"), malformed


def test_no_signing_key_is_a_500(env: Env, tmp_path: Path) -> None:
    env.config.state_dir = str(tmp_path / "gone")  # no key file, and none can be made
    assert env.put_token(A_IP).status_code == 500
    got = env.get("/latest/meta-data/instance-id", A_IP,
                  headers={"X-aws-ec2-metadata-token": "v1.a.b"})
    assert got.status_code == 500 and "state directory" in got.text


def test_a_forwarded_token_request_is_refused(env: Env) -> None:
    got = env.put_token(A_IP, **{"X-Forwarded-For": "203.0.113.9"})
    assert got.status_code == 403 and not got.text.startswith("v1.")
    [event] = env.events("imds-token-refused")
    assert event.details["forwarded_for"] == "203.0.113.9"


def test_require_token_mode(env: Env) -> None:
    env.config.lifecycle.imds_require_token = True
    got = env.get("/latest/meta-data/instance-id", A_IP)
    assert got.status_code == 401 and "PUT /latest/api/token" in got.text
    assert env.get("/latest/user-data", A_IP).status_code == 401
    token = env.put_token(A_IP).text
    got = env.get("/latest/meta-data/instance-id", A_IP,
                  headers={"X-aws-ec2-metadata-token": token})
    assert got.status_code == 200


# ---- NoCloud ------------------------------------------------------------------------------

def test_nocloud_seed(env: Env) -> None:
    a = env.info(A_MAC)
    seed = f"/nocloud/{a['seed_token']}"
    meta = env.get(f"{seed}/meta-data", "10.9.9.9")  # any address: the token is the key
    assert meta.status_code == 200 and meta.mimetype == "text/plain"
    assert yaml.safe_load(meta.text) == {"instance-id": a["instance_id"],
                                         "local-hostname": "a.lab.example",
                                         "hostname": "a.lab.example"}
    assert env.get(f"{seed}/vendor-data", A_IP).text == "#cloud-config\n{}\n"
    assert env.get(f"{seed}/user-data", A_IP).text.startswith("#cloud-config\n")
    assert env.get(f"{seed}/network-config", A_IP).status_code == 404
    assert env.get(f"{seed}/../{a['seed_token']}/meta-data", A_IP).status_code == 404
    assert env.events("seed-token-unknown") == []


def test_a_seed_token_is_the_credential(env: Env) -> None:
    a, b = env.info(A_MAC), env.info(B_MAC)
    # B's token asked from A's address: B's data, since the token is B's.
    got = env.get(f"/nocloud/{b['seed_token']}/meta-data", A_IP)
    assert yaml.safe_load(got.text)["instance-id"] == b["instance_id"]
    user = env.get(f"/nocloud/{b['seed_token']}/user-data", A_IP).text
    assert B_KEY in user and OPERATOR not in user and a["seed_token"] not in user
    wrong = [a["seed_token"][:-1] + ("A" if a["seed_token"][-1] != "A" else "B"),
             "x" * 32, "x" * 65, a["instance_id"]]
    for token in wrong:
        for name in ("meta-data", "user-data", "vendor-data", "network-config"):
            got = env.get(f"/nocloud/{token}/{name}", NOBODY)
            assert got.status_code == 404 and "i-" not in got.text
    events = env.events("seed-token-unknown")
    assert len(events) == 1 and events[0].details["client"] == NOBODY


def test_a_seed_token_without_a_deployment_gets_404(env: Env) -> None:
    c = env.info(C_MAC)
    assert c["seed_token"] and c["instance_id"] is None
    assert env.get(f"/nocloud/{c['seed_token']}/meta-data", C_IP).status_code == 404
    [event] = env.events("seed-token-unknown")
    assert event.machine_id == c["id"]


# ---- phone-home ---------------------------------------------------------------------------

def _phone_home(env: Env, token: str, **form: str):  # type: ignore[no-untyped-def]
    return env.client.post(f"/phone-home/{token}", base_url=BASE, data=form,
                           environ_base={"REMOTE_ADDR": A_IP})


def test_phone_home_moves_the_machine_to_the_contract_check(env: Env) -> None:
    a = env.info(A_MAC)
    got = _phone_home(env, a["seed_token"], instance_id=a["instance_id"], hostname="a",
                      fqdn="a.lab.example", pub_key_ed25519=HOST_KEY + "\n", pub_key_dsa="",
                      pub_key_rsa="", pub_key_ecdsa="")
    assert (got.status_code, got.text) == (200, "ok\n")
    after = env.info(A_MAC)
    assert (after["state"], after["phase"]) == ("installing", "contract")
    assert after["ssh_host_keys"] == {"ssh-ed25519": HOST_KEY}
    [state] = env.events("state")
    assert state.details["step"] == "phone-home" and state.details["client"] == A_IP
    # again: the machine is past first boot now
    again = _phone_home(env, a["seed_token"], instance_id=a["instance_id"],
                        pub_key_ed25519=HOST_KEY)
    assert again.status_code == 409 and "installing/contract" in again.text


def test_phone_home_of_another_deployment_is_refused(env: Env) -> None:
    a = env.info(A_MAC)
    got = _phone_home(env, a["seed_token"], instance_id="i-0123456789abcdef0",
                      pub_key_ed25519=HOST_KEY)
    assert got.status_code == 409 and "i-0123456789abcdef0" in got.text
    after = env.info(A_MAC)
    assert (after["phase"], after["ssh_host_keys"]) == ("first-boot", None)
    [event] = env.events("phone-home-refused")
    assert event.machine_id == a["id"] and event.details["client"] == A_IP
    # without host keys: refused, and nothing stored
    got = _phone_home(env, a["seed_token"], instance_id=a["instance_id"])
    assert got.status_code == 409 and env.info(A_MAC)["phase"] == "first-boot"


def test_phone_home_unknown_token_and_size_limit(env: Env) -> None:
    a = env.info(A_MAC)
    got = _phone_home(env, "x" * 32, instance_id=a["instance_id"], pub_key_ed25519=HOST_KEY)
    assert got.status_code == 404
    assert len(env.events("seed-token-unknown")) == 1
    big = _phone_home(env, a["seed_token"], instance_id=a["instance_id"],
                      pub_key_ed25519=HOST_KEY, pad="x" * (64 * 1024))
    assert big.status_code == 413
    assert env.info(A_MAC)["phase"] == "first-boot"
    assert env.client.get(f"/phone-home/{a['seed_token']}", base_url=BASE).status_code == 405
    assert metadata_module.MAX_PHONE_HOME_BYTES == 64 * 1024
