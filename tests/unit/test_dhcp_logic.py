"""Allocation, reservations, leases, the RFC 2131 request states and boot steering,
driven with scapy-crafted packets through the real codec and handlers (no sockets)."""

from __future__ import annotations

import pytest
from scapy.compat import raw
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, UDP

from appliance.dhcp.background import SeenRecorder
from appliance.dhcp.codec import decode, int_to_ip, ip_to_int
from appliance.dhcp.handler import HandlerConfig, ServerHandler
from appliance.dhcp.leases import BOUND, DECLINED, RELEASED, LeaseTable, Reservation, SubnetInfo
from appliance.dhcp.packets import Incoming
from appliance.dhcp.proxy import ProxyHandler
from appliance.dhcp.stats import Counters
from appliance.dhcp.steering import SteeringConfig, classify, steer
from appliance.dhcp.transport import ip_udp_packet

SERVER = "10.250.2.1"
A = "52:54:00:00:00:0a"
B = "52:54:00:00:00:0b"
R = "52:54:00:00:00:0c"
NOW = 1_700_000_000.0


def subnet(sid: int = 1, net: str = "10.250.2.0", prefix: int = 24, start: str = "10.250.2.100",
           end: str = "10.250.2.102", **kw) -> SubnetInfo:  # type: ignore[no-untyped-def]
    s = SubnetInfo(id=sid, network=ip_to_int(net), prefix=prefix, pool_start=ip_to_int(start),
                   pool_end=ip_to_int(end), router=ip_to_int(SERVER), cidr=f"{net}/{prefix}",
                   dns=(ip_to_int(SERVER),), domain="lab", lease_seconds=600, **kw)
    s.excluded.add(s.router)
    return s


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def packet(mac: str, mt: str, opts=(), **fields):  # type: ignore[no-untyped-def]
    return decode(raw(BOOTP(chaddr=mac_bytes(mac), xid=7, **fields)
                      / DHCP(options=[("message-type", mt), *opts, "end"])))


def rx(local: str = SERVER, port: int = 67) -> Incoming:
    return Incoming(b"", 0, 68, 3, ip_to_int(local), port, NOW)


@pytest.fixture
def server():  # type: ignore[no-untyped-def]
    sub = subnet()
    sub.add_reservation(Reservation(R, ip_to_int("10.250.2.20"), "reserved-host"))
    relayed = subnet(2, "10.250.3.0", 24, "10.250.3.100", "10.250.3.150")
    table = LeaseTable([sub, relayed])
    cfg = HandlerConfig(SteeringConfig("undionly.kpxe", "ipxe.efi", 8080), "", 30)
    counters = Counters()
    h = ServerHandler(table, cfg, counters, SeenRecorder(counters))
    return h


def seen_log(h: ServerHandler) -> list[tuple[str, str, str | None]]:
    assert isinstance(h.seen, SeenRecorder)
    return list(h.seen.queue)


def reply(out):  # type: ignore[no-untyped-def]
    return BOOTP(out.payload)


def opts(p) -> dict:  # type: ignore[no-untyped-def]
    return {o[0]: (o[1] if len(o) == 2 else o[1:]) for o in p[DHCP].options if isinstance(o, tuple)}


def dora(h: ServerHandler, mac: str, now: float = NOW, **kw) -> str:  # type: ignore[no-untyped-def]
    offer = h.handle(packet(mac, "discover", **kw), rx(), now)
    ip = reply(offer).yiaddr
    ack = h.handle(packet(mac, "request", [("requested_addr", ip), ("server_id", SERVER)], **kw),
                   rx(), now)
    assert opts(reply(ack))["message-type"] == 5
    return ip


def test_only_machines_being_provisioned_get_timeline_exchanges(server: ServerHandler) -> None:
    assert isinstance(server.seen, SeenRecorder)
    watched, other = "52:54:00:aa:00:01", "52:54:00:aa:00:02"
    server.seen.watched = frozenset({watched})
    pxe = [("vendor_class_id", b"PXEClient:Arch:00000:UNDI:002001")]
    ip = reply(server.handle(packet(watched, "discover", pxe), rx(), NOW)).yiaddr
    server.handle(packet(watched, "request", [*pxe, ("requested_addr", ip),
                                              ("server_id", SERVER)]), rx(), NOW)
    dora(server, other)
    got = [(mac, kind, address, boot) for mac, _at, kind, address, boot
           in server.seen.exchanges]
    assert got == [(watched, "offer", ip, "undionly.kpxe"), (watched, "ack", ip, "undionly.kpxe")]
    # the same exchange again at once (a PXE retry loop) is not another event
    server.handle(packet(watched, "discover", pxe), rx(), NOW)
    assert len(server.seen.exchanges) == 2


def test_offer_carries_lease_and_network_options(server: ServerHandler) -> None:
    out = server.handle(packet(A, "discover"), rx(), NOW)
    p = reply(out)
    o = opts(p)
    assert p.op == 2 and p.yiaddr == "10.250.2.100" and o["message-type"] == 2
    assert o["server_id"] == SERVER and o["subnet_mask"] == "255.255.255.0"
    assert o["router"] == SERVER and o["name_server"] == SERVER and o["domain"] == b"lab"
    assert o["lease_time"] == 600 and o["renewal_time"] == 300 and o["rebinding_time"] == 525
    assert "vendor_class_id" not in o and p.file.rstrip(b"\0") == b""  # not a PXE client
    assert out.l2_dst == mac_bytes(A) and out.dst_ip == ip_to_int("10.250.2.100")  # unicast
    assert seen_log(server) == [(A, server.ifname(3), None)]
    server.handle(packet(A, "discover"), rx(), NOW)
    assert len(seen_log(server)) == 1  # once a minute per MAC


def test_broadcast_flag_and_nak_and_relay_routing(server: ServerHandler) -> None:
    out = server.handle(packet(A, "discover", flags=0x8000), rx(), NOW)
    assert out.dst_ip == 0xFFFFFFFF and out.l2_dst is None and out.dst_port == 68
    nak = server.handle(packet(A, "request", [("requested_addr", "10.250.9.9")]), rx(), NOW)
    assert opts(reply(nak))["message-type"] == 6 and nak.dst_ip == 0xFFFFFFFF
    relayed = server.handle(packet(A, "discover", giaddr="10.250.3.1"), rx(), NOW)
    assert relayed.dst_ip == ip_to_int("10.250.3.1") and relayed.dst_port == 67
    assert reply(relayed).yiaddr.startswith("10.250.3.")


def test_same_mac_gets_same_address_and_others_do_not(server: ServerHandler) -> None:
    ip_a = dora(server, A)
    assert dora(server, A) == ip_a
    ip_b = dora(server, B)
    assert ip_b != ip_a
    # B asks for A's bound address: NAK in every state.
    nak = server.handle(packet(B, "request", [("requested_addr", ip_a)]), rx(), NOW)
    assert opts(reply(nak))["message-type"] == 6
    offer = server.handle(packet(B, "discover", [("requested_addr", ip_a)]), rx(), NOW)
    assert reply(offer).yiaddr == ip_b


def test_pool_exhaustion_and_expiry(server: ServerHandler) -> None:
    from appliance.dhcp.codec import DropPacket

    macs = [f"52:54:00:00:01:{i:02x}" for i in range(3)]
    got = {dora(server, m) for m in macs}
    assert got == {"10.250.2.100", "10.250.2.101", "10.250.2.102"}
    with pytest.raises(DropPacket):
        server.handle(packet(B, "discover"), rx(), NOW + 10)
    later = NOW + 601  # all leases expired
    offer = server.handle(packet(B, "discover"), rx(), later)
    assert reply(offer).yiaddr in got


def test_reservation_is_honoured(server: ServerHandler) -> None:
    out = server.handle(packet(R, "discover"), rx(), NOW)
    assert reply(out).yiaddr == "10.250.2.20"
    assert opts(reply(out))["hostname"] == b"reserved-host"
    assert dora(server, R) == "10.250.2.20"
    # nobody else gets the reserved address, even when asking for it
    nak = server.handle(packet(A, "request", [("requested_addr", "10.250.2.20"),
                                              ("server_id", SERVER)]), rx(), NOW)
    assert opts(reply(nak))["message-type"] == 6


def test_request_states(server: ServerHandler) -> None:
    from appliance.dhcp.codec import DropPacket

    ip = dora(server, A)
    # SELECTING another server: our offer is withdrawn, no reply
    with pytest.raises(DropPacket):
        server.handle(packet(A, "request", [("requested_addr", ip), ("server_id", "10.250.2.99")]),
                      rx(), NOW)
    # INIT-REBOOT with a known binding: ACK
    ack = server.handle(packet(A, "request", [("requested_addr", ip)]), rx(), NOW)
    assert opts(reply(ack))["message-type"] == 5 and ack.durable
    # INIT-REBOOT from a client we do not know, free address: silent (RFC 2131 4.3.2)
    with pytest.raises(DropPacket):
        server.handle(packet(B, "request", [("requested_addr", "10.250.2.101")]), rx(), NOW)
    # RENEWING: unicast from ciaddr, reply unicast to ciaddr
    renew = server.handle(packet(A, "request", ciaddr=ip), rx(), NOW + 300)
    assert opts(reply(renew))["message-type"] == 5 and renew.dst_ip == ip_to_int(ip)
    assert reply(renew).ciaddr == ip and renew.l2_dst is None
    assert server.table.by_ip[ip_to_int(ip)].expires == NOW + 300 + 600
    # REBINDING someone else's address: NAK
    nak = server.handle(packet(B, "request", ciaddr=ip, flags=0x8000), rx(), NOW)
    assert opts(reply(nak))["message-type"] == 6


def test_release_decline_inform_and_dirty_rows(server: ServerHandler) -> None:
    ip = dora(server, A)
    dirty = server.table.take_dirty()
    assert [(int_to_ip(e.ip), e.mac, e.state) for e in dirty] == [(ip, A, BOUND)]
    assert server.handle(packet(A, "release", [("server_id", SERVER)], ciaddr=ip), rx(),
                         NOW) is None
    assert server.table.by_ip[ip_to_int(ip)].state == RELEASED
    # released: same MAC gets it back first
    assert reply(server.handle(packet(A, "discover"), rx(), NOW)).yiaddr == ip
    ip_b = dora(server, B)
    server.handle(packet(B, "decline", [("requested_addr", ip_b), ("server_id", SERVER)]),
                  rx(), NOW)
    assert server.table.by_ip[ip_to_int(ip_b)].state == DECLINED
    assert reply(server.handle(packet(B, "discover"), rx(), NOW)).yiaddr != ip_b
    inform = server.handle(packet(A, "inform", ciaddr=ip), rx(), NOW)
    p = reply(inform)
    assert opts(p)["message-type"] == 5 and p.yiaddr == "0.0.0.0" and "lease_time" not in opts(p)
    assert inform.dst_ip == ip_to_int(ip)


def test_no_subnet_means_no_answer() -> None:
    table = LeaseTable([])
    cfg = HandlerConfig(SteeringConfig("undionly.kpxe", "ipxe.efi", 8080))
    counters = Counters()
    h = ServerHandler(table, cfg, counters)
    assert h.handle(packet(A, "discover"), rx(), NOW) is None
    assert counters["dropped_no_subnet"] == 1


def test_relay_agent_info_is_echoed(server: ServerHandler) -> None:
    out = server.handle(packet(A, "discover", [("relay_agent_information", b"\x01\x03abc")],
                               giaddr="10.250.3.1"), rx(), NOW)
    o = reply(out)[DHCP].options
    named = [x for x in o if isinstance(x, tuple)]
    assert named[-1] == ("relay_agent_information", b"\x01\x03abc")


# -- boot steering -------------------------------------------------------------------
STEER = SteeringConfig("undionly.kpxe", "ipxe.efi", 8080)


@pytest.mark.parametrize(
    ("options", "kind", "file", "vendor"),
    [
        ([("vendor_class_id", b"PXEClient:Arch:00000:UNDI:002001"),
          ("pxe_client_architecture", b"\x00\x00")], "tftp", "undionly.kpxe", b"PXEClient"),
        ([("vendor_class_id", b"PXEClient:Arch:00000:UNDI:002001")], "tftp", "undionly.kpxe",
         b"PXEClient"),
        ([("vendor_class_id", b"PXEClient:Arch:00007:UNDI:003016"),
          ("pxe_client_architecture", b"\x00\x07")], "tftp", "ipxe.efi", b"PXEClient"),
        ([("vendor_class_id", b"PXEClient:Arch:00009:UNDI:003016"),
          ("pxe_client_architecture", b"\x00\x09")], "tftp", "ipxe.efi", b"PXEClient"),
        ([("vendor_class_id", b"HTTPClient:Arch:00016:UNDI:003001"),
          ("pxe_client_architecture", b"\x00\x10")], "http",
         "http://10.250.2.1:8080/tftp/ipxe.efi", b"HTTPClient"),
        ([("vendor_class_id", b"PXEClient:Arch:00000:UNDI:002001"),
          ("pxe_client_architecture", b"\x00\x00"), ("user_class", b"iPXE")], "ipxe",
         f"http://10.250.2.1:8080/boot/{A}.ipxe", b"PXEClient"),
        ([("user_class", b"\x04iPXE")], "ipxe", f"http://10.250.2.1:8080/boot/{A}.ipxe", None),
    ],
)
def test_steering_table(options, kind, file, vendor) -> None:  # type: ignore[no-untyped-def]
    pkt = packet(A, "discover", options)
    boot = steer(classify(pkt.options), A, STEER, ip_to_int(SERVER), SERVER)
    assert boot is not None
    assert (boot.kind, boot.file, boot.vendor_class) == (kind, file, vendor)


def test_non_pxe_and_unknown_arch_get_no_boot() -> None:
    for options in ([], [("vendor_class_id", b"MSFT 5.0")],
                    [("vendor_class_id", b"PXEClient:Arch:00011:UNDI:003000"),
                     ("pxe_client_architecture", b"\x00\x0b")],
                    [("vendor_class_id", b"HTTPClient:Arch:00019")]):
        pkt = packet(A, "discover", options)
        assert steer(classify(pkt.options), A, STEER, 1, "x") is None


def test_full_server_pxe_reply_fields(server: ServerHandler) -> None:
    out = server.handle(packet(A, "discover", [
        ("vendor_class_id", b"PXEClient:Arch:00000:UNDI:002001"),
        ("pxe_client_architecture", b"\x00\x00"),
        ("pxe_client_machine_identifier", b"\x00" + bytes(16))]), rx(), NOW)
    p = reply(out)
    o = opts(p)
    assert p.siaddr == SERVER and p.file.rstrip(b"\0") == b"undionly.kpxe"
    assert o["vendor_class_id"] == b"PXEClient" and o["vendor_specific"] == b"\x06\x01\x08\xff"
    assert o["pxe_client_machine_identifier"] == b"\x00" + bytes(16)
    assert seen_log(server)[-1][2] == "bios"
    # iPXE gets its script URL; the public address wins when set
    server.boot.cfg.public_address = "192.0.2.10"
    out = server.handle(packet(A, "discover", [("user_class", b"iPXE")]), rx(), NOW)
    p = reply(out)
    assert p.file.rstrip(b"\0") == f"http://192.0.2.10:8080/boot/{A}.ipxe".encode()
    assert opts(p)["boot-file-name"] == f"http://192.0.2.10:8080/boot/{A}.ipxe".encode()


def test_proxy_offers_boot_info_without_address() -> None:
    cfg = HandlerConfig(SteeringConfig("undionly.kpxe", "ipxe.efi", 8080))
    counters = Counters()
    h = ProxyHandler(cfg, counters)
    pxe = [("vendor_class_id", b"PXEClient:Arch:00007:UNDI:003016"),
           ("pxe_client_architecture", b"\x00\x07")]
    out = h.handle(packet(A, "discover", pxe), rx(), NOW)
    p = reply(out)
    o = opts(p)
    assert o["message-type"] == 2 and p.yiaddr == "0.0.0.0" and p.siaddr == SERVER
    assert p.file.rstrip(b"\0") == b"ipxe.efi" and o["vendor_class_id"] == b"PXEClient"
    assert o["server_id"] == SERVER and "lease_time" not in o and "subnet_mask" not in o
    assert out.dst_ip == 0xFFFFFFFF
    # follow-up REQUEST on port 4011 from the client's new address: unicast ACK back
    req = packet(A, "request", pxe, ciaddr="10.250.2.77")
    port_rx = Incoming(b"", ip_to_int("10.250.2.77"), 68, 3, ip_to_int(SERVER), 4011, NOW)
    ack = h.handle(req, port_rx, NOW)
    assert opts(reply(ack))["message-type"] == 5 and reply(ack).yiaddr == "0.0.0.0"
    assert ack.dst_ip == ip_to_int("10.250.2.77") and ack.dst_port == 68
    assert ack.src_port == 4011 and reply(ack).file.rstrip(b"\0") == b"ipxe.efi"
    # non-PXE clients and REQUESTs for the real server are ignored
    assert h.handle(packet(B, "discover"), rx(), NOW) is None
    assert h.handle(packet(A, "request", [*pxe, ("server_id", "10.250.2.2")]), rx(), NOW) is None
    # iPXE in proxy mode: script URL, and PXEClient so iPXE takes it as a proxy offer
    out = h.handle(packet(A, "discover", [*pxe, ("user_class", b"iPXE")]), rx(), NOW)
    assert reply(out).file.rstrip(b"\0") == f"http://{SERVER}:8080/boot/{A}.ipxe".encode()
    assert opts(reply(out))["vendor_class_id"] == b"PXEClient"


def test_raw_ip_udp_packet_checksums_agree_with_scapy() -> None:
    payload = raw(BOOTP(op=2, chaddr=mac_bytes(A)) / DHCP(options=[("message-type", 2), "end"]))
    for extra in (b"", b"x"):  # even and odd lengths
        wire = ip_udp_packet(payload + extra, ip_to_int(SERVER), ip_to_int("10.250.2.100"), 67, 68)
        p = IP(wire)
        assert p.src == SERVER and p.dst == "10.250.2.100" and p[UDP].sport == 67
        ref = IP(raw(IP(src=SERVER, dst="10.250.2.100", tos=0x10, id=0) / UDP(sport=67, dport=68)
                     / (payload + extra)))
        assert p.chksum == ref.chksum and p[UDP].chksum == ref[UDP].chksum
        assert raw(p[UDP].payload) == payload + extra
