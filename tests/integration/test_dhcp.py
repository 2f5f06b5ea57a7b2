"""The DHCP server against real clients in network namespaces.

Layout per test: the appliance in the ``namespace`` fixture's namespace; clients in
namespaces of their own joined by veth pairs (or through a bridge for proxyDHCP).
Addresses: 10.250.2.0/24 direct segment, 10.250.3.0/24 behind a relay (10.250.4.0/24
between relay and appliance), 10.250.5.0/24 proxyDHCP segment.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from scapy.compat import raw
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, UDP
from sqlalchemy import select

from appliance.db import Database, read_counters
from appliance.models import Lease, Machine, Reservation, Subnet
from tests import netns
from tests.conftest import ApplianceProcess

SERVER_IP = "10.250.2.1"
RELAY_LINK_SERVER = "10.250.4.1"
RELAY_LINK_RELAY = "10.250.4.2"
GIADDR = "10.250.3.1"
CLIENT_IF = "dcli0"

# -- a tiny send/receive helper run inside a namespace (no scapy there: fast start) -----
PROBE = textwrap.dedent(r'''
    import json, select, socket, struct, sys, time
    a = json.loads(sys.argv[1])
    out = []
    if a["mode"] == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        if a.get("iface"):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, a["iface"].encode())
        s.bind(tuple(a["bind"]))
        for p in a["send"]:
            s.sendto(bytes.fromhex(p), tuple(a["dst"]))
            time.sleep(a.get("gap", 0))
        recv = lambda: s.recvfrom(4096)
    else:  # raw: whole IPv4 packets on an interface without an address
        s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
        s.bind((a["iface"], 0x0800))
        for p in a["send"]:
            s.sendto(bytes.fromhex(p), (a["iface"], 0x0800, 0, 0, b"\xff" * 6))
            time.sleep(a.get("gap", 0))
        def recv():
            while True:
                pkt, addr = s.recvfrom(65535)
                if addr[2] == socket.PACKET_OUTGOING or len(pkt) < 28 or pkt[9] != 17:
                    continue
                ihl = (pkt[0] & 15) * 4
                sport, dport = struct.unpack("!HH", pkt[ihl:ihl + 4])
                if dport == a.get("dport", 68):
                    return pkt[ihl + 8:], (socket.inet_ntoa(pkt[12:16]), sport)
    deadline = time.monotonic() + a["timeout"]
    while len(out) < a.get("count", 1 << 30):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([s], [], [], left)[0]:
            break
        data, src = recv()
        out.append([data.hex(), src[0], src[1]])
    print(json.dumps(out))
''')


def probe(ns: netns.Namespace, **args) -> list[tuple[bytes, str, int]]:  # type: ignore[no-untyped-def]
    args["send"] = [p.hex() for p in args.get("send", [])]
    res = ns.exec([sys.executable, "-c", PROBE, json.dumps(args)], timeout=args["timeout"] + 20)
    return [(bytes.fromhex(h), ip, port) for h, ip, port in json.loads(res.stdout)]


def opts(p) -> dict:  # type: ignore[no-untyped-def]
    return {o[0]: (o[1] if len(o) == 2 else o[1:]) for o in p[DHCP].options
            if isinstance(o, tuple)}


def dhcp(mac: str, mt: str, options=(), **fields) -> bytes:  # type: ignore[no-untyped-def]
    return raw(BOOTP(chaddr=bytes.fromhex(mac.replace(":", "")), xid=fields.pop("xid", 0x4242),
                     **fields) / DHCP(options=[("message-type", mt), *options, "end"]))


def broadcast_ip(payload: bytes) -> bytes:
    return raw(IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67) / payload)


# -- fixtures ------------------------------------------------------------------------
class Rig:
    """The appliance namespace, a client namespace on 10.250.2.0/24, optionally a relay."""

    def __init__(self, server: netns.Namespace, tmp: Path, db_url: str) -> None:
        self.server = server
        self.tmp = tmp
        self.db_url = db_url
        self.db = Database(db_url)
        self.db.migrate()
        self.client = netns.new_namespace()
        self.extra: list[netns.Namespace] = [self.client]
        netns.veth(server, "dsrv0", self.client, CLIENT_IF)
        server.ip("addr", "add", f"{SERVER_IP}/24", "dev", "dsrv0")
        self.app: ApplianceProcess | None = None

    def add_relay(self) -> netns.Namespace:
        relay = netns.new_namespace()
        self.extra.append(relay)
        netns.veth(self.server, "dsrv1", relay, "drly0")
        self.server.ip("addr", "add", f"{RELAY_LINK_SERVER}/24", "dev", "dsrv1")
        relay.ip("addr", "add", f"{RELAY_LINK_RELAY}/24", "dev", "drly0")
        relay.ip("addr", "add", f"{GIADDR}/32", "dev", "drly0")
        self.server.ip("route", "add", "10.250.3.0/24", "via", RELAY_LINK_RELAY)
        return relay

    def add_subnet(self, network: str, start: str, end: str, lease: int = 600,
                   router: str | None = None) -> int:
        with self.db.session() as s:
            sub = Subnet(network=network, pool_start=start, pool_end=end, router=router,
                         dns_servers=router or "", domain_name="lab.test", lease_seconds=lease)
            s.add(sub)
            s.flush()
            return sub.id

    def start(self, mode: str = "server") -> ApplianceProcess:
        toml = textwrap.dedent(f"""
            state_dir = "{self.tmp / 'state'}"
            database_url = "{self.db_url}"
            log_level = "INFO"
            [http]
            port = 8080
            [dhcp]
            mode = "{mode}"
        """)
        self.app = ApplianceProcess(self.server, self.tmp, toml, only=["dhcp"])
        self.app.start()
        self.app.wait_log("listening on 0.0.0.0:67", timeout=30)
        return self.app

    def stop(self) -> None:
        if self.app is not None:
            self.app.stop()

    def leases(self) -> dict[str, tuple[str, str, float]]:
        with self.db.session() as s:
            return {r.mac: (r.ip, r.state, r.expires_at.timestamp())
                    for r in s.scalars(select(Lease))}

    def close(self) -> None:
        self.stop()
        for ns in self.extra:
            ns.delete()
        self.db.dispose()


@pytest.fixture
def rig(namespace: netns.Namespace, tmp_path: Path, database_url: str) -> Iterator[Rig]:
    """The rig on SQLite and on PostgreSQL (over its Unix socket, reachable from namespaces):
    every lease test runs on both."""
    r = Rig(namespace, tmp_path, database_url)
    try:
        yield r
    finally:
        r.close()
        if r.app is not None:
            print(r.app.log()[-4000:])


# -- real clients ---------------------------------------------------------------------
UDHCPC_SCRIPT = """#!/bin/sh
echo "$1 ip=$ip mask=$mask router=$router dns=$dns domain=$domain lease=$lease \\
  serverid=$serverid" >> {out}
case "$1" in
  bound|renew) ip addr flush dev "$interface"; ip addr add "$ip/$mask" dev "$interface" ;;
  deconfig) ip addr flush dev "$interface" ;;
esac
exit 0
"""

DHCLIENT_SCRIPT = """#!/bin/sh
echo "$reason ip=$new_ip_address mask=$new_subnet_mask lease=$new_dhcp_lease_time \\
  server=$new_dhcp_server_identifier" >> {out}
case "$reason" in
  BOUND|RENEW|REBIND|REBOOT) ip addr replace "$new_ip_address/$new_subnet_mask" dev "$interface" ;;
  RELEASE|EXPIRE|STOP) ip addr flush dev "$interface" ;;
esac
exit 0
"""


def write_script(path: Path, template: str) -> Path:
    out = path.with_suffix(".events")
    path.write_text(template.format(out=out))
    path.chmod(0o755)
    return out


def events(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def wait_event(path: Path, prefix: str, count: int = 1, timeout: float = 20) -> str:
    def found() -> str | None:
        hits = [e for e in events(path) if e.startswith(prefix)]
        return hits[count - 1] if len(hits) >= count else None

    return netns.wait_for(found, timeout, what=f"{prefix} #{count} in {events(path)}")


def field(event: str, name: str) -> str:
    for part in event.split():
        if part.startswith(name + "="):
            return part.split("=", 1)[1]
    raise KeyError(name)


def udhcpc_once(rig: Rig, tmp: Path, tag: str) -> str:
    """busybox udhcpc -q: get one lease and quit; returns the address."""
    out = write_script(tmp / f"udhcpc-{tag}.sh", UDHCPC_SCRIPT)
    rig.client.exec(["busybox", "udhcpc", "-i", CLIENT_IF, "-f", "-q", "-n", "-t", "5", "-T",
                     "1", "-s", str(tmp / f"udhcpc-{tag}.sh")], timeout=30)
    return field(wait_event(out, "bound"), "ip")


def set_mac(ns: netns.Namespace, mac: str) -> None:
    ns.ip("link", "set", CLIENT_IF, "down")
    ns.ip("link", "set", CLIENT_IF, "address", mac)
    ns.ip("link", "set", CLIENT_IF, "up")


def client_mac(rig: Rig) -> str:
    res = rig.client.exec(["cat", f"/sys/class/net/{CLIENT_IF}/address"])
    return res.stdout.strip()


# -- tests --------------------------------------------------------------------------
def test_udhcpc_lease_renew_release(rig: Rig, tmp_path: Path) -> None:
    rig.add_subnet("10.250.2.0/24", "10.250.2.100", "10.250.2.150", router=SERVER_IP)
    rig.start()
    out = write_script(tmp_path / "u.sh", UDHCPC_SCRIPT)
    proc = rig.client.popen(["busybox", "udhcpc", "-i", CLIENT_IF, "-f", "-t", "5", "-T", "1",
                             "-s", str(tmp_path / "u.sh")], log=tmp_path / "udhcpc.log")
    bound = wait_event(out, "bound")
    ip = field(bound, "ip")
    assert ip.startswith("10.250.2.") and 100 <= int(ip.rsplit(".", 1)[1]) <= 150
    assert field(bound, "serverid") == SERVER_IP and field(bound, "router") == SERVER_IP
    assert field(bound, "lease") == "600" and field(bound, "mask") == "24"
    mac = client_mac(rig)
    ip_db, state, expires1 = rig.leases()[mac]
    assert (ip_db, state) == (ip, "bound")
    time.sleep(1.1)
    os.kill(proc.pid, signal.SIGUSR1)  # renew (unicast REQUEST from ciaddr)
    wait_event(out, "renew")
    assert rig.leases()[mac][2] > expires1
    os.kill(proc.pid, signal.SIGUSR2)  # release
    netns.wait_for(lambda: rig.leases()[mac][1] == "released", 10, what="released lease")
    rig.client.stop(proc)
    # the machine was registered as discovered, seen on the appliance's interface
    netns.wait_for(lambda: _machine(rig, mac), 15, what="machine registered")
    assert _machine(rig, mac).seen_on == "dsrv0"


def _machine(rig: Rig, mac: str) -> Machine | None:
    with rig.db.session() as s:
        return s.scalar(select(Machine).where(Machine.mac == mac))


def test_dhclient_lease_renew_release(rig: Rig, tmp_path: Path) -> None:
    rig.add_subnet("10.250.2.0/24", "10.250.2.100", "10.250.2.150", lease=6, router=SERVER_IP)
    rig.start()
    out = write_script(tmp_path / "d.sh", DHCLIENT_SCRIPT)
    conf = tmp_path / "dhclient.conf"
    conf.write_text("")
    common = ["-cf", str(conf), "-sf", str(tmp_path / "d.sh"), "-lf",
              str(tmp_path / "dhclient.leases"), "-pf", str(tmp_path / "dhclient.pid")]
    proc = rig.client.popen(["dhclient", "-4", "-d", "-v", *common, CLIENT_IF],
                            log=tmp_path / "dhclient.log")
    bound = wait_event(out, "BOUND", timeout=30)
    ip = field(bound, "ip")
    assert ip.startswith("10.250.2.") and field(bound, "server") == SERVER_IP
    mac = client_mac(rig)
    assert rig.leases()[mac][:2] == (ip, "bound")
    expires1 = rig.leases()[mac][2]
    renew = wait_event(out, "RENEW", timeout=20)  # T1 = 3 s: dhclient renews by itself
    assert field(renew, "ip") == ip
    assert rig.leases()[mac][2] > expires1
    rig.client.exec(["dhclient", "-4", "-r", *common, CLIENT_IF], timeout=30)
    netns.wait_for(lambda: rig.leases()[mac][1] == "released", 10, what="released lease")
    rig.client.stop(proc)


def test_reservation_is_honoured(rig: Rig, tmp_path: Path) -> None:
    sid = rig.add_subnet("10.250.2.0/24", "10.250.2.100", "10.250.2.150")
    with rig.db.session() as s:
        s.add(Reservation(mac="52:54:00:aa:bb:01", ip="10.250.2.42", hostname="fixed",
                          subnet_id=sid))
    rig.start()
    set_mac(rig.client, "52:54:00:aa:bb:01")
    assert udhcpc_once(rig, tmp_path, "r1") == "10.250.2.42"
    set_mac(rig.client, "52:54:00:aa:bb:02")
    other = udhcpc_once(rig, tmp_path, "r2")
    assert other != "10.250.2.42" and other.startswith("10.250.2.1")


def test_relayed_request_gets_address_from_giaddr_subnet(rig: Rig) -> None:
    rig.add_subnet("10.250.2.0/24", "10.250.2.100", "10.250.2.150")
    rig.add_subnet("10.250.3.0/24", "10.250.3.100", "10.250.3.150", router=GIADDR)
    relay = rig.add_relay()
    rig.start()
    mac = "52:54:00:33:00:01"
    agent = [("relay_agent_information", b"\x01\x05port7")]
    common = dict(mode="udp", bind=["0.0.0.0", 67], dst=[RELAY_LINK_SERVER, 67], count=1,
                  timeout=5)
    got = probe(relay, send=[dhcp(mac, "discover", agent, giaddr=GIADDR, hops=1)], **common)
    assert got, "no OFFER to the relay"
    offer = BOOTP(got[0][0])
    assert got[0][2] == 67 and offer.giaddr == GIADDR
    o = opts(offer)
    assert o["message-type"] == 2 and o["router"] == GIADDR
    assert offer.yiaddr.startswith("10.250.3.") and o["server_id"] == RELAY_LINK_SERVER
    assert o["relay_agent_information"] == b"\x01\x05port7"
    got = probe(relay, send=[dhcp(mac, "request", [("requested_addr", offer.yiaddr),
                                                   ("server_id", RELAY_LINK_SERVER), *agent],
                                  giaddr=GIADDR, hops=1)], **common)
    ack = BOOTP(got[0][0])
    assert opts(ack)["message-type"] == 5 and ack.yiaddr == offer.yiaddr
    assert rig.leases()[mac][:2] == (offer.yiaddr, "bound")
    with rig.db.session() as s:
        lease = s.scalar(select(Lease).where(Lease.mac == mac))
        assert s.get(Subnet, lease.subnet_id).network == "10.250.3.0/24"
    # a relay for a network we do not serve gets nothing
    got = probe(relay, send=[dhcp(mac, "discover", giaddr=RELAY_LINK_RELAY)], **common)
    assert got == []


def test_leases_survive_restart(rig: Rig, tmp_path: Path) -> None:
    rig.add_subnet("10.250.2.0/24", "10.250.2.100", "10.250.2.150")
    rig.start()
    set_mac(rig.client, "52:54:00:44:00:01")
    first = udhcpc_once(rig, tmp_path, "a")
    rig.stop()
    rig.start()
    assert udhcpc_once(rig, tmp_path, "b") == first  # same MAC, same address
    set_mac(rig.client, "52:54:00:44:00:02")
    other = udhcpc_once(rig, tmp_path, "c")  # the bound address is not given away
    assert other != first
    rig.stop()
    counters = read_counters(rig.db)["dhcp"]
    assert counters["acks"] >= 1 and counters["offers"] >= 1


def test_garbage_is_dropped_and_counted_and_service_continues(rig: Rig, tmp_path: Path) -> None:
    rig.add_subnet("10.250.2.0/24", "10.250.2.100", "10.250.2.150")
    rig.add_subnet("10.250.4.0/24", "10.250.4.100", "10.250.4.150")
    relay = rig.add_relay()
    app = rig.start()
    good = dhcp("52:54:00:55:00:01", "discover")
    garbage = [
        b"",  # empty
        b"\x01\x01\x06",  # truncated header
        good[:239],  # truncated before the options
        good[:240] + b"\x35\x09\x01",  # option length overruns the packet
        b"\x02" + good[1:],  # BOOTREPLY sent to the server
        good[:1] + b"\x06\x06" + good[3:],  # not Ethernet
        good[:1] + b"\x01\x10" + good[3:],  # hlen 16
        os.urandom(300),  # garbage
        good + b"\x00" * 2000,  # oversized (fragmented over the veth)
        dhcp("52:54:00:55:00:02", "discover") + b"\x00" * 1000,  # large but fine
    ]
    probe(relay, mode="udp", bind=[RELAY_LINK_RELAY, 6868], dst=[RELAY_LINK_SERVER, 67],
          send=garbage * 3, timeout=0.5, gap=0.01)
    app.wait_log("malformed so far")
    app.wait_log("oversized so far")
    # a real client still gets a lease afterwards
    assert udhcpc_once(rig, tmp_path, "after").startswith("10.250.2.1")
    rig.stop()
    c = read_counters(rig.db)["dhcp"]
    assert c["dropped_malformed"] >= 7 * 3 - 1, c  # (random bytes may be another reason)
    assert c["dropped_oversized"] == 3, c
    assert c["received"] >= len(garbage) * 3 and c["acks"] >= 1
    assert "Traceback" not in app.log()


# -- proxyDHCP beside dnsmasq -----------------------------------------------------------
PXE_OPTS = [("vendor_class_id", b"PXEClient:Arch:00007:UNDI:003016"),
            ("pxe_client_architecture", b"\x00\x07"),
            ("pxe_client_machine_identifier", b"\x00" + bytes(range(16)))]


def test_proxydhcp_beside_dnsmasq(namespace: netns.Namespace, tmp_path: Path) -> None:
    hub = namespace  # a bridge; the appliance, dnsmasq and the client hang off it
    netns.bridge(hub, "br0", None)
    spaces = {name: netns.new_namespace() for name in ("app", "dns", "cli")}
    try:
        for i, (name, ns) in enumerate(spaces.items()):
            netns.veth(hub, f"p{i}", ns, f"{name}0")
            hub.ip("link", "set", f"p{i}", "master", "br0")
        spaces["app"].ip("addr", "add", "10.250.5.2/24", "dev", "app0")
        spaces["dns"].ip("addr", "add", "10.250.5.3/24", "dev", "dns0")
        dnsmasq = spaces["dns"].popen([
            "dnsmasq", "--conf-file=/dev/null", "--no-daemon", "--bind-interfaces",
            "--interface=dns0", "--except-interface=lo", "--port=0", "--user=root",
            "--dhcp-range=10.250.5.100,10.250.5.150,255.255.255.0,10m", "--pid-file",
            f"--dhcp-leasefile={tmp_path / 'dnsmasq.leases'}", "--log-dhcp",
            "--log-facility=-"], log=tmp_path / "dnsmasq.log")
        db_url = f"sqlite:///{tmp_path / 'appliance.db'}"
        db = Database(db_url)
        db.migrate()
        toml = textwrap.dedent(f"""
            state_dir = "{tmp_path / 'state'}"
            database_url = "{db_url}"
            [dhcp]
            mode = "proxy"
        """)
        app = ApplianceProcess(spaces["app"], tmp_path, toml, only=["dhcp"])
        app.start()
        app.wait_log("listening on 0.0.0.0:4011")
        mac = "52:54:00:66:00:01"
        cli = spaces["cli"]
        got = probe(cli, mode="raw", iface="cli0", count=2, timeout=6,
                    send=[broadcast_ip(dhcp(mac, "discover", PXE_OPTS, flags=0x8000))])
        offers = {BOOTP(d)[DHCP] and opts(BOOTP(d))["server_id"]: BOOTP(d) for d, _, _ in got}
        assert set(offers) == {"10.250.5.2", "10.250.5.3"}, (got, app.log(), dnsmasq.poll())
        proxy, real = offers["10.250.5.2"], offers["10.250.5.3"]
        assert proxy.yiaddr == "0.0.0.0" and proxy.siaddr == "10.250.5.2"
        assert proxy.file.rstrip(b"\0") == b"ipxe.efi"
        po = opts(proxy)
        assert po["message-type"] == 2 and po["vendor_class_id"] == b"PXEClient"
        assert po["pxe_client_machine_identifier"] == b"\x00" + bytes(range(16))
        assert "lease_time" not in po and "subnet_mask" not in po
        assert real.yiaddr.startswith("10.250.5.1")
        # the address comes from dnsmasq
        got = probe(cli, mode="raw", iface="cli0", count=1, timeout=6, send=[broadcast_ip(
            dhcp(mac, "request", [*PXE_OPTS, ("requested_addr", real.yiaddr),
                                  ("server_id", "10.250.5.3")], flags=0x8000))])
        ack = BOOTP(got[0][0])
        assert opts(ack)["message-type"] == 5 and ack.yiaddr == real.yiaddr
        # then the PXE ROM asks the proxy on port 4011 for its boot file
        cli.ip("addr", "add", f"{real.yiaddr}/24", "dev", "cli0")
        got = probe(cli, mode="udp", bind=[real.yiaddr, 68], dst=["10.250.5.2", 4011],
                    count=1, timeout=5,
                    send=[dhcp(mac, "request", PXE_OPTS, ciaddr=real.yiaddr)])
        assert got and got[0][2] == 4011
        boot = BOOTP(got[0][0])
        assert opts(boot)["message-type"] == 5 and boot.yiaddr == "0.0.0.0"
        assert boot.file.rstrip(b"\0") == b"ipxe.efi" and boot.siaddr == "10.250.5.2"
        # a client that is not PXE gets nothing from the proxy
        got = probe(cli, mode="udp", bind=[real.yiaddr, 68], dst=["10.250.5.2", 4011],
                    count=1, timeout=1, send=[dhcp(mac, "request", ciaddr=real.yiaddr)])
        assert got == []
        app.stop()
        spaces["dns"].stop(dnsmasq)
        with db.session() as s:
            assert s.scalar(select(Lease)) is None  # the proxy never hands out addresses
            assert s.scalar(select(Machine).where(Machine.mac == mac)) is not None
        db.dispose()
    finally:
        for ns in spaces.values():
            ns.delete()


def test_perfdhcp_short_flood(rig: Rig) -> None:
    """Kea's perfdhcp (acting as a relay) completes DORA exchanges; leases are stored."""
    rig.add_subnet("10.250.2.0/24", "10.250.2.10", "10.250.2.250")
    rig.client.ip("addr", "add", "10.250.2.2/24", "dev", CLIENT_IF)
    rig.start()
    res = rig.client.exec(["perfdhcp", "-4", "-l", CLIENT_IF, "-r", "300", "-R", "200",
                           "-p", "3"], check=False, timeout=60)
    text = res.stdout + res.stderr
    stats = text.split("REQUEST-ACK")[1]
    sent = int(stats.split("sent packets:")[1].split()[0])
    received = int(stats.split("received packets:")[1].split()[0])
    assert sent > 500 and received >= 0.9 * sent, text
    leases = rig.leases()
    assert len(leases) >= 150 and all(state == "bound" for _, state, _ in leases.values())
