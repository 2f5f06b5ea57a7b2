"""Building replies: the option sets and where each reply goes (RFC 2131 §4.1, §4.3)."""

from __future__ import annotations

import struct

from appliance.dhcp.codec import BROADCAST_FLAG, DhcpPacket, encode_option, encode_reply
from appliance.dhcp.leases import SubnetInfo
from appliance.dhcp.options import (
    BOOTFILE_NAME,
    BROADCAST_ADDRESS,
    CLIENT_ID,
    CLIENT_MACHINE_ID,
    CLIENT_PORT,
    DNS_SERVERS,
    DOMAIN_NAME,
    HOSTNAME,
    LEASE_TIME,
    MESSAGE,
    MESSAGE_TYPE,
    NAK,
    PXE_DISCOVERY_CONTROL,
    PXE_USE_BOOTFILE,
    REBINDING_TIME,
    RELAY_AGENT_INFO,
    RENEWAL_TIME,
    ROUTER,
    SERVER_ID,
    SERVER_PORT,
    SUBNET_MASK,
    VENDOR_CLASS,
    VENDOR_SPECIFIC,
)
from appliance.dhcp.packets import Incoming, Outgoing
from appliance.dhcp.steering import PXE_CLIENT, BootInfo

BROADCAST_IP = 0xFFFFFFFF
_MT = {mt: bytes((MESSAGE_TYPE, 1, mt)) for mt in range(1, 9)}
#: PXE vendor options (43): discovery control = use the boot file in this packet.
PXE_VENDOR_OPTIONS = bytes((PXE_DISCOVERY_CONTROL, 1, PXE_USE_BOOTFILE, 255))
_I = struct.Struct("!I")
_SERVER_ID_OPTS: dict[int, bytes] = {}  # server id -> encoded option 54


def ip_opt(code: int, *ips: int) -> bytes:
    return encode_option(code, b"".join(_I.pack(ip) for ip in ips))


def subnet_options(sub: SubnetInfo) -> bytes:
    """The per-subnet options every OFFER/ACK carries (cached by the caller)."""
    out = [ip_opt(SUBNET_MASK, sub.mask), ip_opt(BROADCAST_ADDRESS, sub.broadcast)]
    if sub.router:
        out.append(ip_opt(ROUTER, sub.router))
    if sub.dns:
        out.append(ip_opt(DNS_SERVERS, *sub.dns))
    if sub.domain:
        out.append(encode_option(DOMAIN_NAME, sub.domain.encode()))
    return b"".join(out)


def lease_options(seconds: int) -> bytes:
    return (encode_option(LEASE_TIME, _I.pack(seconds))
            + encode_option(RENEWAL_TIME, _I.pack(seconds // 2))
            + encode_option(REBINDING_TIME, _I.pack(seconds * 7 // 8)))


def boot_options(boot: BootInfo | None, pkt: DhcpPacket) -> tuple[bytes, bytes]:
    """(options, file field) for a boot client."""
    if boot is None:
        return b"", b""
    parts = []
    if boot.vendor_class is not None:
        parts.append(encode_option(VENDOR_CLASS, boot.vendor_class))
        if boot.vendor_class == PXE_CLIENT:
            parts.append(encode_option(VENDOR_SPECIFIC, PXE_VENDOR_OPTIONS))
    if boot.kind != "tftp":
        parts.append(encode_option(BOOTFILE_NAME, boot.file.encode()))
    machine_id = pkt.options.get(CLIENT_MACHINE_ID)
    if machine_id is not None:
        parts.append(encode_option(CLIENT_MACHINE_ID, machine_id))
    file = boot.file.encode()
    return b"".join(parts), file if len(file) < 128 else b""


def leading_options(msg_type: int, server_id: int) -> bytes:
    """Options 53 and 54, which every reply starts with."""
    sid = _SERVER_ID_OPTS.get(server_id)
    if sid is None:
        if len(_SERVER_ID_OPTS) > 256:
            _SERVER_ID_OPTS.clear()
        sid = _SERVER_ID_OPTS[server_id] = ip_opt(SERVER_ID, server_id)
    return _MT[msg_type] + sid


def build(
    pkt: DhcpPacket,
    msg_type: int,
    server_id: int,
    *,
    yiaddr: int = 0,
    siaddr: int = 0,
    body: bytes = b"",
    file: bytes = b"",
    hostname: str | None = None,
    message: str | None = None,
) -> bytes:
    """A reply to ``pkt``: message type, server id, ``body`` options, echoes (61, 82)."""
    return finish(pkt, msg_type, leading_options(msg_type, server_id) + body, yiaddr,
                  siaddr, file, hostname, message)


def finish(pkt: DhcpPacket, msg_type: int, opts: bytes, yiaddr: int, siaddr: int,
           file: bytes = b"", hostname: str | None = None,
           message: str | None = None) -> bytes:
    """The reply's bytes: ``opts`` (already encoded, starting with ``leading_options``),
    then hostname and message when given, the echoes (61, 82), END and padding."""
    if hostname:
        opts += encode_option(HOSTNAME, hostname.encode())
    if message:
        opts += encode_option(MESSAGE, message.encode())
    options = pkt.options
    client_id = options.get(CLIENT_ID)
    if client_id is not None:
        opts += encode_option(CLIENT_ID, client_id)  # RFC 6842
    giaddr = pkt.giaddr
    if giaddr and RELAY_AGENT_INFO in options:
        opts += encode_option(RELAY_AGENT_INFO, options[RELAY_AGENT_INFO])  # RFC 3046: last
    flags, ciaddr = pkt.flags, pkt.ciaddr
    if msg_type == NAK:
        ciaddr = 0
        if giaddr:
            flags |= BROADCAST_FLAG
    return encode_reply(pkt.xid, flags, ciaddr, yiaddr, siaddr, giaddr, pkt.chaddr, opts,
                        file)


def route(pkt: DhcpPacket, rx: Incoming, msg_type: int, yiaddr: int, payload: bytes,
          server_id: int, durable: bool = False) -> Outgoing:
    """Where a reply goes (RFC 2131 §4.1)."""
    if pkt.giaddr:
        return Outgoing(payload, pkt.giaddr, SERVER_PORT, rx.port, server_id, 0,
                        durable=durable)
    if msg_type == NAK:
        return Outgoing(payload, BROADCAST_IP, CLIENT_PORT, rx.port, server_id, rx.ifindex,
                        durable=durable)
    if pkt.ciaddr:
        return Outgoing(payload, pkt.ciaddr, CLIENT_PORT, rx.port, server_id, 0,
                        durable=durable)
    if pkt.broadcast or not yiaddr or not rx.ifindex:
        return Outgoing(payload, BROADCAST_IP, CLIENT_PORT, rx.port, server_id, rx.ifindex,
                        durable=durable)
    return Outgoing(payload, yiaddr, CLIENT_PORT, rx.port, server_id, rx.ifindex,
                    l2_dst=pkt.chaddr[:6], durable=durable)
