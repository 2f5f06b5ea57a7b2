"""The lean codec agrees field for field with scapy's BOOTP/DHCP dissection."""

from __future__ import annotations

import socket

import pytest
from scapy.compat import raw
from scapy.layers.dhcp import BOOTP, DHCP, DHCPOptions, DHCPRevOptions

from appliance.dhcp import codec
from appliance.dhcp.codec import (
    DhcpPacket,
    MalformedPacket,
    OversizedPacket,
    decode,
    encode_options,
    encode_packet,
    int_to_ip,
    ip_to_int,
    peek_message_type,
)

MAC = b"\x52\x54\x00\x12\x34\x56"


def scapy_option_bytes(opt) -> tuple[int, bytes] | None:  # type: ignore[no-untyped-def]
    """(code, raw value) of one option as scapy dissected it, re-encoded by scapy."""
    if isinstance(opt, str):  # 'pad' / 'end'
        return None
    name = opt[0]
    code = name if isinstance(name, int) else DHCPRevOptions[name][0]
    tlv = raw(DHCP(options=[opt]))
    assert tlv[0] == code
    return code, tlv[2 : 2 + tlv[1]]


def scapy_options(pkt) -> dict[int, bytes]:  # type: ignore[no-untyped-def]
    out: dict[int, bytes] = {}
    for opt in pkt[DHCP].options:
        got = scapy_option_bytes(opt)
        if got is not None:
            code, value = got
            out[code] = out.get(code, b"") + value
    return out


def assert_header_agrees(mine: DhcpPacket, theirs) -> None:  # type: ignore[no-untyped-def]
    assert mine.op == theirs.op
    assert mine.htype == theirs.htype
    assert mine.hlen == theirs.hlen
    assert mine.hops == theirs.hops
    assert mine.xid == theirs.xid
    assert mine.secs == theirs.secs
    assert mine.flags == int(theirs.flags)
    for f in ("ciaddr", "yiaddr", "siaddr", "giaddr"):
        assert int_to_ip(getattr(mine, f)) == getattr(theirs, f), f
    assert mine.chaddr == theirs.chaddr.ljust(16, b"\x00")
    assert mine.sname == theirs.sname.ljust(64, b"\x00")
    assert mine.file == theirs.file.ljust(128, b"\x00")


# Every packet shape the tests use: (bootp fields, dhcp options) in scapy terms.
CASES = {
    "discover_plain": (
        dict(xid=0x1234, chaddr=MAC, flags=0x8000),
        [("message-type", "discover"), ("client_id", b"\x01" + MAC),
         ("param_req_list", [1, 3, 6, 12, 15, 28, 51, 54]), ("hostname", b"node1"), "end"],
    ),
    "discover_bios_pxe": (
        dict(xid=1, chaddr=MAC, secs=4),
        [("message-type", "discover"), ("vendor_class_id", b"PXEClient:Arch:00000:UNDI:002001"),
         ("pxe_client_architecture", b"\x00\x00"),
         ("pxe_client_network_interface", b"\x01\x02\x01"),
         ("pxe_client_machine_identifier", b"\x00" + bytes(range(16))),
         ("max_dhcp_size", 1260), "end"],
    ),
    "discover_uefi_http": (
        dict(xid=2, chaddr=MAC),
        [("message-type", "discover"), ("vendor_class_id", b"HTTPClient:Arch:00016:UNDI:003000"),
         ("pxe_client_architecture", b"\x00\x10"), "end"],
    ),
    "discover_ipxe": (
        dict(xid=3, chaddr=MAC),
        [("message-type", "discover"), ("vendor_class_id", b"PXEClient:Arch:00007:UNDI:003016"),
         ("pxe_client_architecture", b"\x00\x07"), ("user_class", b"iPXE"), "end"],
    ),
    "request_selecting": (
        dict(xid=4, chaddr=MAC),
        [("message-type", "request"), ("requested_addr", "10.250.2.50"),
         ("server_id", "10.250.2.1"), ("client_id", b"\x01" + MAC), "end"],
    ),
    "request_relayed": (
        dict(xid=5, chaddr=MAC, giaddr="10.250.3.1", hops=1),
        [("message-type", "request"), ("requested_addr", "10.250.3.77"),
         ("relay_agent_information", b"\x01\x04eth7\x02\x03sw1"), "end"],
    ),
    "renew": (
        dict(xid=6, chaddr=MAC, ciaddr="10.250.2.50"),
        [("message-type", "request"), ("lease_time", 600), "end"],
    ),
    "release_with_pads": (
        dict(xid=7, chaddr=MAC, ciaddr="10.250.2.50"),
        [("message-type", "release"), "pad", "pad", ("server_id", "10.250.2.1"), "pad", "end",
         "pad", "pad"],
    ),
    "unknown_and_repeated_options": (
        dict(xid=8, chaddr=MAC),
        [("message-type", "inform"), (224, b"private"), ("vendor_class_id", b"abc"),
         (224, b"-more"), (250, b""), "end"],
    ),
    "odd_lengths": (
        dict(xid=9, chaddr=MAC),
        [("message-type", "decline"), ("requested_addr", "10.250.2.9"),
         ("hostname", b"x" * 255), ("domain", b"a"), "end"],
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_scapy_crafted_decodes_identically(name: str) -> None:
    fields, opts = CASES[name]
    wire = raw(BOOTP(**fields) / DHCP(options=opts))
    mine = decode(wire)
    theirs = BOOTP(wire)
    assert_header_agrees(mine, theirs)
    assert mine.options == scapy_options(theirs)
    assert mine.msg_type == dict(
        (o[0], o[1]) for o in theirs[DHCP].options if isinstance(o, tuple))["message-type"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_codec_encoded_dissects_identically(name: str) -> None:
    fields, opts = CASES[name]
    reference = decode(raw(BOOTP(**fields) / DHCP(options=opts)))
    # Re-encode with the codec, with options in scapy's order, as a reply would be.
    ordered = []
    for o in opts:
        got = scapy_option_bytes(o)
        if got is not None:
            ordered.append(got)
    wire = encode_packet(reference, ordered)
    theirs = BOOTP(wire)
    assert_header_agrees(reference, theirs)
    assert scapy_options(theirs) == reference.options
    assert len(wire) >= codec.MIN_REPLY_LEN


def test_reply_fields_agree_with_scapy() -> None:
    wire = codec.encode(
        op=2, xid=0xDEADBEEF, flags=0x8000, ciaddr=0, yiaddr=ip_to_int("10.250.2.50"),
        siaddr=ip_to_int("10.250.2.1"), giaddr=ip_to_int("10.250.3.1"), chaddr=MAC,
        file=b"undionly.kpxe", sname=b"appliance",
        options=encode_options([(53, b"\x02"), (54, socket.inet_aton("10.250.2.1")),
                                (51, (3600).to_bytes(4, "big")), (60, b"PXEClient"),
                                (43, b"\x06\x01\x08\xff"), (61, b"\x01" + MAC),
                                (82, b"\x01\x04eth7")]))
    p = BOOTP(wire)
    assert p.op == 2 and p.xid == 0xDEADBEEF and int(p.flags) == 0x8000
    assert p.yiaddr == "10.250.2.50" and p.siaddr == "10.250.2.1" and p.giaddr == "10.250.3.1"
    assert p.chaddr[:6] == MAC
    assert p.file.rstrip(b"\x00") == b"undionly.kpxe"
    assert p.sname.rstrip(b"\x00") == b"appliance"
    named = {o[0]: o[1:] for o in p[DHCP].options if isinstance(o, tuple)}
    assert named["message-type"] == (2,)
    assert named["server_id"] == ("10.250.2.1",)
    assert named["lease_time"] == (3600,)
    assert named["vendor_class_id"] == (b"PXEClient",)
    assert named["vendor_specific"] == (b"\x06\x01\x08\xff",)
    assert named["client_id"] == (b"\x01" + MAC,)
    assert named["relay_agent_information"] == (b"\x01\x04eth7",)
    assert [o for o in p[DHCP].options if o != "pad"][-1] == "end"


def test_overloaded_options_in_file_and_sname() -> None:
    file_opts = raw(DHCP(options=[("vendor_class_id", b"PXEClient"), "end"])).ljust(128, b"\0")
    sname_opts = raw(DHCP(options=[("hostname", b"over"), "end"])).ljust(64, b"\0")
    wire = raw(BOOTP(chaddr=MAC, xid=10, file=file_opts, sname=sname_opts)
               / DHCP(options=[("message-type", "discover"), ("dhcp-option-overload", 3),
                               "end"]))
    mine = decode(wire)
    theirs = BOOTP(wire)
    assert_header_agrees(mine, theirs)
    # scapy leaves file/sname raw; dissect them as option areas to compare.
    expected = scapy_options(theirs)
    expected.update(scapy_options(DHCP(theirs.file)))
    expected.update(scapy_options(DHCP(theirs.sname)))
    assert mine.options == expected
    assert mine.options[60] == b"PXEClient" and mine.options[12] == b"over"


def test_peek_message_type() -> None:
    wire = raw(BOOTP(chaddr=MAC) / DHCP(options=[("message-type", "request"), "end"]))
    assert peek_message_type(wire) == 3
    odd = raw(BOOTP(chaddr=MAC) / DHCP(options=["pad", ("message-type", "request"), "end"]))
    assert peek_message_type(odd) == 0 and decode(odd).msg_type == 3


# -- malformed input ---------------------------------------------------------------
GOOD = raw(BOOTP(chaddr=MAC, xid=1) / DHCP(options=[("message-type", "discover"), "end"]))


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (b"", "truncated"),
        (b"\x01", "truncated"),
        (GOOD[:200], "truncated"),
        (GOOD[:239], "truncated"),
        (b"\x02" + GOOD[1:], "wrong_op"),
        (b"\x07" + GOOD[1:], "wrong_op"),
        (GOOD[:1] + b"\x06" + GOOD[2:], "bad_hardware"),  # IEEE 802 / token ring
        (GOOD[:2] + b"\x10" + GOOD[3:], "bad_hardware"),  # hlen 16
        (GOOD[:236] + b"\x00\x00\x00\x00" + GOOD[240:], "no_magic_cookie"),
        (GOOD[:240] + b"\x35\x05\x01", "bad_option_length"),  # overruns
        (GOOD[:240] + b"\x35", "bad_option_length"),  # no length byte
        (GOOD[:240] + b"\x0c\x02ab\xff", "no_message_type"),
        (GOOD[:240] + b"\x35\x02\x01\x01\xff", "no_message_type"),  # length 2
        (bytes(range(256)) * 2, "wrong_op"),
    ],
)
def test_malformed_packets_are_refused(wire: bytes, reason: str) -> None:
    with pytest.raises(MalformedPacket) as exc:
        decode(wire)
    assert exc.value.reason == reason


def test_oversized_packet_is_refused() -> None:
    with pytest.raises(OversizedPacket):
        decode(GOOD + b"\x00" * 2000)


def test_random_garbage_never_raises_anything_else() -> None:
    import random

    rng = random.Random(42)
    for _ in range(3000):
        n = rng.choice([0, 1, 100, 239, 240, 241, 243, 300, 548, 1400, 1600])
        data = bytearray(rng.randbytes(n))
        if n > 240 and rng.random() < 0.7:  # mostly well-formed headers, garbage options
            data[0], data[1], data[2] = 1, 1, 6
            data[236:240] = b"\x63\x82\x53\x63"
        try:
            decode(bytes(data))
        except (MalformedPacket, OversizedPacket):
            pass


def test_every_scapy_option_code_round_trips() -> None:
    """Each option scapy knows as a typed field: codec decode == scapy's raw value."""
    for code, fld in DHCPOptions.items():
        if code in (0, 255, 52, 53) or isinstance(fld, str):
            continue
        value = fld.default
        if isinstance(value, list) or value is None:
            continue
        wire = raw(BOOTP(chaddr=MAC) / DHCP(options=[("message-type", 1), (fld.name, value),
                                                     "end"]))
        assert decode(wire).options == scapy_options(BOOTP(wire)), fld.name


@pytest.mark.parametrize("msg_type", [2, 5, 6])
def test_reply_builder_writes_what_the_codec_encodes(msg_type: int) -> None:
    """``replies.finish`` packs the header itself (hot path): byte for byte what
    ``codec.encode`` (checked against scapy above) writes for the same reply."""
    from appliance.dhcp import replies

    request = decode(raw(
        BOOTP(chaddr=MAC, xid=0xABCD, flags=0x8000, ciaddr="10.250.2.9",
              giaddr="10.250.3.1", hops=1, secs=7)
        / DHCP(options=[("message-type", "request"), ("client_id", b"\x01" + MAC),
                        ("relay_agent_information", b"\x01\x04eth7"), "end"])))
    sid = ip_to_int("10.250.2.1")
    body = encode_options([(51, (3600).to_bytes(4, "big")), (1, socket.inet_aton("255.255.255.0"))])
    got = replies.build(request, msg_type, sid, yiaddr=ip_to_int("10.250.2.50"),
                        siaddr=ip_to_int("10.250.2.1"), body=body, file=b"undionly.kpxe",
                        hostname="node7", message="why" if msg_type == 6 else None)
    opts = [(53, bytes([msg_type])), (54, socket.inet_aton("10.250.2.1"))]
    expected_options = encode_options(opts) + body + encode_options(
        [(12, b"node7")] + ([(56, b"why")] if msg_type == 6 else [])
        + [(61, b"\x01" + MAC), (82, b"\x01\x04eth7")])
    expected = codec.encode(
        op=2, xid=0xABCD, flags=0x8000, ciaddr=0 if msg_type == 6 else ip_to_int("10.250.2.9"),
        yiaddr=ip_to_int("10.250.2.50"), siaddr=ip_to_int("10.250.2.1"),
        giaddr=ip_to_int("10.250.3.1"), chaddr=MAC.ljust(16, b"\x00"),
        options=expected_options, file=b"undionly.kpxe")
    assert got == expected
    assert len(got) >= codec.MIN_REPLY_LEN
