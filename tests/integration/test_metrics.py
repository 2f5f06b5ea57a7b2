"""/metrics of a real ``appliance serve`` after real traffic: a udhcpc lease (DORA), two
malformed DHCP packets, tftp-hpa fetches, HTTP requests with curl; read with curl from
loopback inside the appliance's namespace and refused from the provisioning network.

Layout: the appliance's namespace (10.250.80.1/24) and a client namespace joined by a
veth pair; the client gets its address from the appliance's DHCP server.
"""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.db import Database, read_counters
from appliance.models import Subnet
from tests import netns, promtext
from tests.conftest import ApplianceProcess

SERVER_IP = "10.250.80.1"
CLIENT_IF = "mcli0"
LOCAL = "http://127.0.0.1:8080"
REMOTE = f"http://{SERVER_IP}:8080"
BOOT_MAC = "52:54:00:80:00:01"
FILE_SIZE = 100_000

UDHCPC_SCRIPT = """#!/bin/sh
echo "$1 ip=$ip" >> {out}
case "$1" in
  bound|renew) ip addr flush dev "$interface"; ip addr add "$ip/$mask" dev "$interface" ;;
  deconfig) ip addr flush dev "$interface" ;;
esac
exit 0
"""

Families = dict[str, promtext.MetricFamily]


@dataclass
class Rig:
    server: netns.Namespace
    client: netns.Namespace
    app: ApplianceProcess
    work: Path

    def scrape(self) -> str:
        """GET /metrics from loopback in the appliance's namespace."""
        r = self.server.exec(["curl", "-sS", "-f", "--max-time", "20", f"{LOCAL}/metrics"],
                             timeout=30)
        return r.stdout

    def metrics(self) -> Families:
        return promtext.parse(self.scrape())

    def wait_metrics(self, done: Callable[[Families], bool], what: str,
                     timeout: float = 60) -> Families:
        """Scrape until ``done`` holds (the parts publish every few seconds)."""
        last: list[Families] = []

        def check() -> Families | None:
            families = self.metrics()
            last[:] = [families]
            return families if done(families) else None

        try:
            return netns.wait_for(check, timeout, interval=0.5, what=what)
        except TimeoutError:
            print(self.scrape())
            raise

    def client_get(self, path: str) -> str:
        """HTTP status code of GET ``path`` from the client namespace."""
        r = self.client.exec(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                              "--max-time", "20", f"{REMOTE}{path}"], timeout=30)
        return r.stdout


def value(families: Families, name: str, **labels: str) -> float:
    """A sample's value, 0 when the family or series is not there yet."""
    family = families.get(name)
    if family is None:
        return 0
    return family.total(**labels) if labels else sum(family.samples.values())


@pytest.fixture
def rig(namespace: netns.Namespace, tmp_path: Path) -> Iterator[Rig]:
    state = tmp_path / "state"
    db = Database(f"sqlite:///{state / 'appliance.db'}")
    db.migrate()
    with db.session() as s:
        s.add(Subnet(network="10.250.80.0/24", pool_start="10.250.80.100",
                     pool_end="10.250.80.150", lease_seconds=600))
    db.dispose()
    root = tmp_path / "tftproot"
    root.mkdir()
    (root / "loader.bin").write_bytes(os.urandom(FILE_SIZE))
    client = netns.new_namespace()
    app = None
    try:
        netns.veth(namespace, "msrv0", client, CLIENT_IF)
        namespace.ip("addr", "add", f"{SERVER_IP}/24", "dev", "msrv0")
        config = textwrap.dedent(f"""\
            state_dir = "{state}"
            log_level = "INFO"
            [tftp]
            root = "{root}"
            workers = 1
            [syslog]
            enabled = false
            """)
        app = ApplianceProcess(namespace, tmp_path, config)
        app.start()
        app.wait_log("listening on 0.0.0.0:67", timeout=60)
        app.wait_log("TFTP serving", timeout=60)
        netns.wait_for(lambda: namespace.exec(["curl", "-sf", f"{LOCAL}/healthz"],
                                              check=False).returncode == 0, 60,
                       what="HTTP part up:\n" + app.log()[-3000:])
        yield Rig(namespace, client, app, tmp_path)
    finally:
        if app is not None:
            app.stop()
            print(app.log()[-4000:])
        client.delete()


def _udhcpc(rig: Rig) -> str:
    script = rig.work / "udhcpc.sh"
    out = rig.work / "udhcpc.events"
    script.write_text(UDHCPC_SCRIPT.format(out=out))
    script.chmod(0o755)
    rig.client.exec(["busybox", "udhcpc", "-i", CLIENT_IF, "-f", "-q", "-n", "-t", "5",
                     "-T", "2", "-s", str(script)], timeout=60)
    bound = [line for line in out.read_text().splitlines() if line.startswith("bound")]
    assert bound, out.read_text()
    return bound[0].split("ip=")[1]


def _send_udp(ns: netns.Namespace, payloads: list[bytes], dst: tuple[str, int]) -> None:
    code = ("import socket, sys\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "for p in sys.argv[3:]:\n"
            "    s.sendto(bytes.fromhex(p), (sys.argv[1], int(sys.argv[2])))\n")
    ns.exec([sys.executable, "-c", code, dst[0], str(dst[1]), *(p.hex() for p in payloads)])


def test_metrics_count_real_traffic(rig: Rig) -> None:
    base = rig.metrics()  # before any traffic (the parts may not have published yet)
    http = "appliance_http_requests_total"

    def delta(families: Families, name: str, **labels: str) -> float:
        return value(families, name, **labels) - value(base, name, **labels)

    # DHCP: one DORA by busybox udhcpc, then two malformed packets
    client_ip = _udhcpc(rig)
    assert client_ip.startswith("10.250.80.1")
    truncated = b"\x01\x01\x06"
    bootreply = b"\x02\x01\x06\x00" + bytes(236) + b"\x63\x82\x53\x63\x35\x01\x01\xff"
    _send_udp(rig.client, [truncated, bootreply], (SERVER_IP, 67))
    # TFTP: one file, one name that does not exist
    out = rig.work / "fetched.bin"
    r = rig.client.exec(["tftp", "-m", "binary", SERVER_IP, "-c", "get", "loader.bin",
                         str(out)], check=False)
    assert r.returncode == 0 and out.stat().st_size == FILE_SIZE, r.stderr
    rig.client.exec(["tftp", "-m", "binary", SERVER_IP, "-c", "get", "nope.bin",
                     str(rig.work / "nope.bin")], check=False)
    # HTTP from the provisioning side: 3 boot scripts, a missing image, /metrics refused
    for _ in range(3):
        assert rig.client_get(f"/boot/{BOOT_MAC}.ipxe") == "200"
    assert rig.client_get("/images/discovery/no-such-file") == "404"
    refused = rig.client.exec(["curl", "-sS", "-w", "\n%{http_code}", "--max-time", "20",
                               f"{REMOTE}/metrics"], timeout=30).stdout
    assert refused.endswith("\n403"), refused
    assert "http.metrics_networks" in refused and client_ip in refused
    assert "appliance_" not in refused

    def settled(f: Families) -> bool:
        return (delta(f, "appliance_dhcp_replies_total", type="ack") >= 1
                and delta(f, "appliance_dhcp_dropped_total", reason="malformed") >= 2
                and delta(f, "appliance_tftp_transfers_total", outcome="completed") >= 1
                and delta(f, "appliance_tftp_requests_refused_total", reason="not_found") >= 1
                and delta(f, http, endpoint_group="boot", code_class="2xx") >= 3
                and delta(f, http, endpoint_group="metrics", code_class="4xx") >= 1
                and value(f, "appliance_machines", state="discovered") >= 2)

    f = rig.wait_metrics(settled, "every part's counters published")

    # DHCP: the exchange and the two malformed packets, each datagram accounted for once
    types = ("discover", "request", "decline", "release", "inform", "other")
    received = {t: delta(f, "appliance_dhcp_packets_received_total", type=t) for t in types}
    assert received["discover"] >= 1 and received["request"] >= 1, received
    assert received["decline"] == received["release"] == received["inform"] == 0, received
    assert delta(f, "appliance_dhcp_replies_total", type="offer") == received["discover"]
    assert delta(f, "appliance_dhcp_replies_total", type="ack") == received["request"]
    assert delta(f, "appliance_dhcp_replies_total", type="nak") == 0
    assert delta(f, "appliance_dhcp_dropped_total", reason="malformed") == 2
    assert delta(f, "appliance_dhcp_malformed_total", reason="truncated") == 1
    assert delta(f, "appliance_dhcp_malformed_total", reason="wrong_op") == 1
    assert delta(f, "appliance_dhcp_datagrams_received_total") == (
        sum(received.values()) + 2 + delta(f, "appliance_dhcp_dropped_total", reason="stale"))
    # TFTP: one transfer of FILE_SIZE bytes (more only if blocks were sent again)
    assert delta(f, "appliance_tftp_requests_total") == 2
    assert delta(f, "appliance_tftp_transfers_total", outcome="completed") == 1
    assert delta(f, "appliance_tftp_transfers_total", outcome="failed") == 0
    assert delta(f, "appliance_tftp_requests_refused_total", reason="not_found") == 1
    sent = delta(f, "appliance_tftp_bytes_sent_total")
    if delta(f, "appliance_tftp_retransmits_total") == 0:
        assert sent == FILE_SIZE
    else:
        assert sent > FILE_SIZE
    # HTTP: summed over both gunicorn workers
    assert delta(f, http, endpoint_group="boot", code_class="2xx") == 3
    assert delta(f, http, endpoint_group="images", code_class="4xx") == 1
    assert delta(f, http, endpoint_group="metrics", code_class="4xx") == 1
    assert delta(f, http, endpoint_group="metrics", code_class="2xx") >= 1  # our scrapes
    assert delta(f, http, endpoint_group="boot", code_class="4xx") == 0
    # machines: the DHCP client and the MAC that asked for a boot script, both new
    assert value(f, "appliance_machines", state="discovered") == 2
    assert value(f, "appliance_machines", state="ready") == 0
    # the parts with a heartbeat are alive, and every part's counters were published
    heartbeats = f["appliance_part_heartbeat_timestamp_seconds"]
    assert {dict(labels)["part"] for _, labels in heartbeats.samples} == {"power", "lifecycle"}
    changed = f["appliance_part_counters_changed_timestamp_seconds"]
    assert {"dhcp", "tftp", "http"} <= {dict(labels)["part"] for _, labels in changed.samples}
    assert "Traceback" not in rig.app.log()

    # A request just before the stop is published by the exiting worker ...
    assert rig.client_get("/images/discovery/another-missing-file") == "404"
    rig.app.stop()
    db = Database(f"sqlite:///{rig.work / 'state' / 'appliance.db'}")
    try:
        rows = {p: v for p, v in read_counters(db).items() if p.startswith("http-")}
    finally:
        db.dispose()
    assert sum(v.get("images_4xx", 0) for v in rows.values()) == 2, rows
    # ... and a new HTTP part starts its counters from zero (a counter reset)
    rig.app.start()
    netns.wait_for(lambda: rig.server.exec(["curl", "-sf", f"{LOCAL}/healthz"],
                                           check=False).returncode == 0, 60,
                   what="HTTP part up again")
    f = rig.metrics()
    assert value(f, http, endpoint_group="images", code_class="4xx") == 0
    assert value(f, http, endpoint_group="boot", code_class="2xx") == 0
