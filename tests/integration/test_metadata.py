"""The metadata service under the real daemon (gunicorn, two workers) against real peers:
a machine that got its address from the appliance's DHCP (busybox udhcpc) reads its
metadata with curl from that address; a second host on the same segment (its own
namespace, its own address) gets nothing of it.

Layout: the appliance's namespace has a bridge (10.250.70.1/24); the machine's and the
other host's namespaces hang off it by veth pairs. The machine's deployment is written
into the database directly (what a reimage and a finished install leave behind).
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select

from appliance.catalog import load_catalog
from appliance.config import Config
from appliance.db import Database
from appliance.lifecycle import record_seen
from appliance.lifecycle.operations import new_instance_id
from appliance.models import Event, Lease, Machine, Subnet
from appliance.profiles import configure_machine, set_profile
from tests import netns
from tests.conftest import ApplianceProcess

SERVER_IP = "10.250.70.1"
BASE = f"http://{SERVER_IP}:8080"
OTHER_IP = "10.250.70.77"  # the other host: a static address, no lease
MAC = "52:54:00:70:00:01"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIntegrationOperatorKeyIntegrationOper op@lab"
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostKeyOfTheMachineHostKeyOfTheMach root@m"
WORKERS = 2
UDHCPC_SCRIPT = """#!/bin/sh
echo "$1 ip=$ip mask=$mask" >> {out}
case "$1" in
  bound|renew) ip addr flush dev "$interface"; ip addr add "$ip/$mask" dev "$interface" ;;
  deconfig) ip addr flush dev "$interface" ;;
esac
exit 0
"""


@dataclass
class Rig:
    app: ApplianceProcess
    db: Database
    machine_ns: netns.Namespace
    other_ns: netns.Namespace
    machine_ip: str
    instance_id: str
    seed_token: str

    def curl(self, ns: netns.Namespace, *args: str) -> tuple[int, str]:
        """(HTTP status, body) of one curl run inside ``ns``."""
        out = ns.exec(["curl", "-sS", "--max-time", "20", "-w", "\n%{http_code}", *args],
                      timeout=30)
        body, _, code = out.stdout.rpartition("\n")
        return int(code), body

    def get(self, ns: netns.Namespace, path: str, *headers: str) -> tuple[int, str]:
        return self.curl(ns, *[x for h in headers for x in ("-H", h)], f"{BASE}{path}")

    def put_token(self, ns: netns.Namespace, ttl: int, *headers: str) -> tuple[int, str]:
        return self.curl(ns, "-X", "PUT", "-H", f"X-aws-ec2-metadata-token-ttl-seconds: {ttl}",
                         *[x for h in headers for x in ("-H", h)], f"{BASE}/latest/api/token")

    def events(self, kind: str) -> list[dict[str, Any]]:
        with self.db.session() as s:
            return [{"machine_id": e.machine_id, "message": e.message, **(e.details or {})}
                    for e in s.scalars(select(Event).where(Event.kind == kind)
                                       .order_by(Event.id))]

    def machine(self) -> dict[str, Any]:
        with self.db.session() as s:
            m = s.scalar(select(Machine).where(Machine.mac == MAC))
            return {"state": m.state, "phase": m.phase, "ssh_host_keys": m.ssh_host_keys}


def _deployed_machine(config: Config, db: Database) -> tuple[str, str]:
    """Machine MAC with a current image-deploy deployment, waiting for its first boot."""
    catalog = load_catalog(config)
    with db.session() as s:
        s.add(Subnet(network="10.250.70.0/24", pool_start="10.250.70.100",
                     pool_end="10.250.70.150", lease_seconds=600))
        set_profile(s, catalog, "global", {"ssh_authorized_keys": [KEY]})
        m = record_seen(s, MAC, "test", actor="test", arch="bios")
        configure_machine(s, catalog, m, bootenv="image-deploy", hostname="meta-a.lab.test",
                          values={"image": "os/x.raw", "image_sha256": "0" * 64})
        m.instance_id = new_instance_id()
        m.deployment = {"number": 1, "bootenv": "image-deploy", "actor": "test",
                        "instance_id": m.instance_id}
        m.bootenv, m.install_token = "local", None
        m.state, m.phase = "installing", "first-boot"
        return m.instance_id, m.seed_token or ""


@pytest.fixture
def rig(namespace: netns.Namespace, tmp_path: Path, database_url: str) -> Iterator[Rig]:
    netns.bridge(namespace, "br0", f"{SERVER_IP}/24")
    machine_ns = netns.new_namespace()
    other_ns = netns.new_namespace()
    app: ApplianceProcess | None = None
    db = Database(database_url)
    try:
        for ns, inside, outside in ((machine_ns, "mcli0", "mv0"), (other_ns, "ocli0", "ov0")):
            netns.veth(namespace, outside, ns, inside)
            namespace.ip("link", "set", outside, "master", "br0")
        other_ns.ip("addr", "add", f"{OTHER_IP}/24", "dev", "ocli0")
        machine_ns.ip("link", "set", "mcli0", "down")
        machine_ns.ip("link", "set", "mcli0", "address", MAC)
        machine_ns.ip("link", "set", "mcli0", "up")
        state = tmp_path / "state"
        state.mkdir()  # the signing key's key file goes there
        config = Config(state_dir=str(state), database_url=database_url)
        db.migrate()
        instance_id, seed_token = _deployed_machine(config, db)
        app = ApplianceProcess(namespace, tmp_path, textwrap.dedent(f"""
            state_dir = "{state}"
            database_url = "{database_url}"
            [http]
            port = 8080
            workers = {WORKERS}
            [dhcp]
            mode = "server"
        """), only=["dhcp", "http"])
        app.start()
        app.wait_log("listening on 0.0.0.0:67", timeout=30)
        netns.wait_for(lambda: namespace.exec(["curl", "-sf", f"{BASE}/healthz"],
                                              check=False).returncode == 0, 30,
                       what="HTTP part up:\n" + app.log())
        # The machine's lease, from the appliance's DHCP.
        script = tmp_path / "udhcpc.sh"
        events = tmp_path / "udhcpc.events"
        script.write_text(UDHCPC_SCRIPT.format(out=events))
        script.chmod(0o755)
        machine_ns.exec(["busybox", "udhcpc", "-i", "mcli0", "-f", "-q", "-n", "-t", "5",
                         "-T", "1", "-s", str(script)], timeout=30)
        bound = [line for line in events.read_text().splitlines() if line.startswith("bound")]
        machine_ip = bound[0].split()[1].removeprefix("ip=")

        def leased() -> bool:
            with db.session() as s:
                lease = s.scalar(select(Lease).where(Lease.ip == machine_ip))
                return lease is not None and lease.state == "bound" and lease.mac == MAC

        netns.wait_for(leased, 15, what="the bound lease in the database")
        yield Rig(app, db, machine_ns, other_ns, machine_ip, instance_id, seed_token)
    finally:
        if app is not None:
            app.stop()
            print(app.log()[-4000:])
        machine_ns.delete()
        other_ns.delete()
        db.dispose()


def test_a_leased_machine_reads_its_metadata_and_nobody_else_does(rig: Rig) -> None:
    m, other = rig.machine_ns, rig.other_ns
    assert rig.machine_ip.startswith("10.250.70.")

    # -- the machine, from its leased address --------------------------------------------
    assert rig.get(m, "/") == (200, "2009-04-04\n2021-03-23\nlatest")
    code, index = rig.get(m, "/2021-03-23/meta-data/")
    assert code == 200 and index.split("\n") == [
        "ami-id", "ami-launch-index", "hostname", "instance-id", "instance-type",
        "local-hostname", "local-ipv4", "mac", "placement/", "public-keys/",
        "reservation-id", "security-groups"]
    assert rig.get(m, "/2009-04-04/meta-data/instance-id") == (200, rig.instance_id)
    assert rig.get(m, "/latest/meta-data/local-ipv4") == (200, rig.machine_ip)
    assert rig.get(m, "/latest/meta-data/mac") == (200, MAC)
    assert rig.get(m, "/latest/meta-data/local-hostname") == (200, "meta-a.lab.test")
    assert rig.get(m, "/latest/meta-data/public-keys/") == (200, "0=op@lab")
    assert rig.get(m, "/latest/meta-data/public-keys/0/") == (200, "openssh-key")
    assert rig.get(m, "/latest/meta-data/public-keys/0/openssh-key") == (200, KEY)
    assert rig.get(m, "/latest/meta-data/placement/availability-zone") == (200, "appliance")
    code, user_data = rig.get(m, "/2021-03-23/user-data")
    assert code == 200 and user_data.startswith("#cloud-config\n")
    cloud_config = yaml.safe_load(user_data)
    assert cloud_config["phone_home"]["url"] == f"{BASE}/phone-home/{rig.seed_token}"
    assert cloud_config["ssh_authorized_keys"] == [KEY]
    # IMDSv2: a token, then every read with it (whichever worker answers).
    code, token = rig.put_token(m, 21600)
    assert code == 200 and token.startswith("v1.")
    header = f"X-aws-ec2-metadata-token: {token}"
    for _ in range(6):
        assert rig.get(m, "/latest/meta-data/instance-id", header) == (200, rig.instance_id)
    assert rig.get(m, "/latest/user-data", header) == (200, user_data)
    assert rig.put_token(m, 0)[0] == 400
    assert rig.put_token(m, 60, "X-Forwarded-For: 203.0.113.5")[0] == 403
    # NoCloud with the machine's seed token
    code, meta = rig.get(m, f"/nocloud/{rig.seed_token}/meta-data")
    assert code == 200 and yaml.safe_load(meta)["instance-id"] == rig.instance_id
    assert rig.get(m, f"/nocloud/{rig.seed_token}/user-data") == (200, user_data)
    assert rig.get(m, f"/nocloud/{rig.seed_token}/network-config")[0] == 404

    # -- the other host, from its own address -----------------------------------------------
    for path in ("/latest/meta-data/", "/latest/meta-data/instance-id", "/latest/user-data",
                 "/latest/meta-data/public-keys/0/openssh-key"):
        code, body = rig.get(other, path)
        assert code == 404 and rig.instance_id not in body and "ssh-" not in body, path
    assert rig.put_token(other, 60)[0] == 404
    # the machine's token replayed from the other address
    code, body = rig.get(other, "/latest/meta-data/instance-id", header)
    assert (code, body) == (401, "token issued to another address\n")
    assert rig.get(other, "/latest/user-data", header)[0] == 401
    # wrong and missing seed tokens
    wrong = rig.seed_token[:-1] + ("A" if rig.seed_token[-1] != "A" else "B")
    for path in (f"/nocloud/{wrong}/meta-data", f"/nocloud/{wrong}/user-data",
                 "/nocloud/user-data"):
        code, body = rig.get(other, path)
        assert code == 404 and rig.instance_id not in body, path

    # -- an expired token ---------------------------------------------------------------------
    code, short = rig.put_token(m, 1)
    assert code == 200
    time.sleep(1.1)
    assert rig.get(m, "/latest/meta-data/instance-id", f"X-aws-ec2-metadata-token: {short}"
                   ) == (401, "token expired\n")

    # -- the events -----------------------------------------------------------------------------
    unknown = rig.events("metadata-unknown")
    assert 1 <= len(unknown) <= WORKERS  # one per client and minute, per worker
    assert {e["client"] for e in unknown} == {OTHER_IP} and unknown[0]["machine_id"] is None
    refused = rig.events("imds-token-refused")
    assert {e["client"] for e in refused} == {OTHER_IP, rig.machine_ip}  # replay, proxy
    assert any(e["reason"] == "X-Forwarded-For" for e in refused)
    replay = [e for e in refused if e["client"] == OTHER_IP]
    assert replay and all(e["reason"] == "token issued to another address" for e in replay)
    seeds = rig.events("seed-token-unknown")
    assert 1 <= len(seeds) <= WORKERS and {e["client"] for e in seeds} == {OTHER_IP}
    served = rig.events("user-data")
    assert [e["source"] for e in served] == ["ec2", "ec2", "nocloud"]
    assert {e["client"] for e in served} == {rig.machine_ip}


def test_phone_home_from_the_installed_os(rig: Rig, tmp_path: Path) -> None:
    m = rig.machine_ns
    url = f"{BASE}/phone-home/{rig.seed_token}"
    # wrong token: 404; wrong instance: 409; too large (sized and chunked): 413
    assert rig.curl(m, "-d", f"instance_id={rig.instance_id}", f"{BASE}/phone-home/nope"
                    )[0] == 404
    code, body = rig.curl(m, "-d", "instance_id=i-0000", "--data-urlencode",
                          f"pub_key_ed25519={HOST_KEY}", url)
    assert code == 409 and "i-0000" in body
    big = tmp_path / "big"
    big.write_text(f"instance_id={rig.instance_id}&pad=" + "x" * 70_000)
    assert rig.curl(m, "--data-binary", f"@{big}", url)[0] == 413
    assert rig.curl(m, "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{big}",
                    url)[0] == 413
    assert rig.machine()["phase"] == "first-boot"
    # what cloud-init's phone_home posts
    code, body = rig.curl(m, "-d", f"instance_id={rig.instance_id}", "-d", "hostname=meta-a",
                          "-d", "fqdn=meta-a.lab.test", "--data-urlencode",
                          f"pub_key_ed25519={HOST_KEY}", "-d", "pub_key_rsa=", url)
    assert (code, body) == (200, "ok\n")
    after = rig.machine()
    assert (after["state"], after["phase"]) == ("installing", "contract")
    assert after["ssh_host_keys"] == {"ssh-ed25519": HOST_KEY}
    refused = rig.events("phone-home-refused")
    assert len(refused) == 1 and "i-0000" in refused[0]["message"]
    assert [e["client"] for e in rig.events("seed-token-unknown")] == [rig.machine_ip]
    states = rig.events("state")
    assert states[-1]["step"] == "phone-home" and states[-1]["client"] == rig.machine_ip
