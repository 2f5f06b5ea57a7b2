"""A lean BOOTP/DHCP codec for the hot path.

scapy (``scapy.layers.dhcp``) is the reference for every field: the unit tests encode
with this module and dissect with scapy, craft with scapy and decode here, and compare
field for field. This module exists only because scapy's per-packet cost is too high
for the server's packet rate.

Addresses are kept as 32-bit integers (network order value), options as raw bytes keyed
by code. Repeated options are concatenated (RFC 3396); options overloaded into the
``file``/``sname`` fields (option 52) are parsed too.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

from appliance.dhcp.options import (
    BOOTREQUEST,
    MAGIC_COOKIE,
    MESSAGE_TYPE,
    OVERLOAD,
)

HEADER = struct.Struct("!BBBBIHHIIII16s64s128s")
HEADER_LEN = HEADER.size  # 236
#: The header and the magic cookie, packed in one call when encoding.
_HEADER_COOKIE = struct.Struct(HEADER.format + "4s")
#: The fixed header and the magic cookie, unpacked in one go.
_HEADER_COOKIE = struct.Struct("!BBBBIHHIIII16s64s128s4s")
OPTIONS_OFFSET = HEADER_LEN + 4  # after the magic cookie
#: Smallest BOOTP message many clients accept (RFC 1542 §3.3 pads replies to 300).
MIN_REPLY_LEN = 300
#: Largest DHCP message accepted: one Ethernet frame's UDP payload, with headroom.
MAX_PACKET_LEN = 1500
BROADCAST_FLAG = 0x8000


class DropPacket(ValueError):  # noqa: N818 - a reason to drop, not an error of ours
    """The packet is not something the server answers; ``reason`` names a counter."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class MalformedPacket(DropPacket):
    """The packet is broken (truncated, bad option lengths, wrong op or hardware type)."""


class OversizedPacket(DropPacket):
    """The packet is larger than any DHCP message we accept."""


@dataclass(slots=True)
class DhcpPacket:
    op: int = BOOTREQUEST
    htype: int = 1
    hlen: int = 6
    hops: int = 0
    xid: int = 0
    secs: int = 0
    flags: int = 0
    ciaddr: int = 0
    yiaddr: int = 0
    siaddr: int = 0
    giaddr: int = 0
    chaddr: bytes = b"\x00" * 16
    sname: bytes = b"\x00" * 64
    file: bytes = b"\x00" * 128
    options: dict[int, bytes] = field(default_factory=dict)

    @property
    def msg_type(self) -> int:
        value = self.options.get(MESSAGE_TYPE)
        return value[0] if value else 0

    @property
    def mac(self) -> bytes:
        return self.chaddr[: self.hlen]

    @property
    def broadcast(self) -> bool:
        return bool(self.flags & BROADCAST_FLAG)

    def ip_option(self, code: int) -> int:
        """An option holding one IPv4 address, as an int (0 when absent or malformed)."""
        value = self.options.get(code)
        if value is None or len(value) != 4:
            return 0
        return int.from_bytes(value, "big")


def ip_to_int(text: str) -> int:
    return int.from_bytes(socket.inet_aton(text), "big")


def int_to_ip(value: int) -> str:
    return socket.inet_ntoa(value.to_bytes(4, "big"))


def _parse_options(data: bytes, start: int, end: int, out: dict[int, bytes]) -> None:
    """Parse the TLV options in ``data[start:end]`` into ``out`` (concatenating repeats)."""
    i = start
    while i < end:
        code = data[i]
        if code == 0:  # PAD
            i += 1
            continue
        if code == 255:  # END
            return
        if i + 1 >= end:
            raise MalformedPacket("bad_option_length", f"option {code} has no length byte")
        j = i + 2 + data[i + 1]
        if j > end:
            raise MalformedPacket(
                "bad_option_length",
                f"option {code} length {data[i + 1]} overruns the packet")
        if code in out:
            out[code] += data[i + 2 : j]
        else:
            out[code] = data[i + 2 : j]
        i = j


def decode(data: bytes, *, require_request: bool = True) -> DhcpPacket:
    """Parse one DHCP message; raise MalformedPacket/OversizedPacket/DropPacket."""
    n = len(data)
    if n > MAX_PACKET_LEN:
        raise OversizedPacket("oversized", f"{n} bytes")
    if n < OPTIONS_OFFSET:
        raise MalformedPacket("truncated", f"{n} bytes")
    (op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr,
     chaddr, sname, file, cookie) = _HEADER_COOKIE.unpack_from(data)
    if op != BOOTREQUEST and require_request:
        raise MalformedPacket("wrong_op", f"op {op}")
    if htype != 1 or hlen != 6:
        raise MalformedPacket("bad_hardware", f"htype {htype} hlen {hlen}")
    if cookie != MAGIC_COOKIE:
        raise MalformedPacket("no_magic_cookie", "plain BOOTP or garbage")
    options: dict[int, bytes] = {}
    _parse_options(data, OPTIONS_OFFSET, n, options)
    if OVERLOAD in options:
        overload = options[OVERLOAD]
        # RFC 2131 §4.1: options field, then 'file', then 'sname'.
        if overload and overload[0] & 1:
            _parse_options(file, 0, len(file), options)
        if overload and overload[0] & 2:
            _parse_options(sname, 0, len(sname), options)
    mt = options.get(MESSAGE_TYPE)
    if mt is None or len(mt) != 1:
        raise MalformedPacket("no_message_type", "no valid option 53")
    return DhcpPacket(op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr,
                      giaddr, chaddr, sname, file, options)


def peek_message_type(data: bytes) -> int:
    """Cheap guess of the message type for triage: option 53 as the first option.

    Returns 0 when it is not in the usual place; the caller then decodes fully.
    """
    if len(data) >= 243 and data[240] == MESSAGE_TYPE and data[241] == 1:
        return data[242]
    return 0


def encode_option(code: int, value: bytes) -> bytes:
    """One option as TLV bytes; values over 255 bytes are split (RFC 3396)."""
    if len(value) <= 255:
        return bytes((code, len(value))) + value
    return b"".join(
        bytes((code, len(value[i : i + 255]))) + value[i : i + 255]
        for i in range(0, len(value), 255)
    )


def encode_options(options: list[tuple[int, bytes]]) -> bytes:
    return b"".join(encode_option(code, value) for code, value in options)


def encode(
    *,
    op: int,
    xid: int,
    flags: int,
    ciaddr: int,
    yiaddr: int,
    siaddr: int,
    giaddr: int,
    chaddr: bytes,
    options: bytes,
    secs: int = 0,
    hops: int = 0,
    sname: bytes = b"",
    file: bytes = b"",
    htype: int = 1,
    hlen: int = 6,
) -> bytes:
    """Build a message; ``options`` is already-encoded TLVs (without the end option)."""
    return _finish(_HEADER_COOKIE.pack(op, htype, hlen, hops, xid, secs, flags, ciaddr,
                                       yiaddr, siaddr, giaddr, chaddr, sname, file,
                                       MAGIC_COOKIE), options)


def encode_reply(xid: int, flags: int, ciaddr: int, yiaddr: int, siaddr: int, giaddr: int,
                 chaddr: bytes, options: bytes, file: bytes = b"") -> bytes:
    """A BOOTREPLY (Ethernet, hops 0, no sname): the bytes of ``encode(op=2, ...)`` with
    positional arguments, for the reply path of every packet."""
    return _finish(_HEADER_COOKIE.pack(2, 1, 6, 0, xid, 0, flags, ciaddr, yiaddr, siaddr,
                                       giaddr, chaddr, b"", file, MAGIC_COOKIE), options)


def _finish(head: bytes, options: bytes) -> bytes:
    out = head + options + b"\xff"
    if len(out) < MIN_REPLY_LEN:
        out += bytes(MIN_REPLY_LEN - len(out))
    return out


def encode_packet(pkt: DhcpPacket, option_list: list[tuple[int, bytes]] | None = None) -> bytes:
    """Encode a DhcpPacket (used by tests and tools); options in dict order unless given."""
    opts = option_list if option_list is not None else list(pkt.options.items())
    return encode(op=pkt.op, xid=pkt.xid, flags=pkt.flags, ciaddr=pkt.ciaddr,
                  yiaddr=pkt.yiaddr, siaddr=pkt.siaddr, giaddr=pkt.giaddr,
                  chaddr=pkt.chaddr, options=encode_options(opts), secs=pkt.secs,
                  hops=pkt.hops, sname=pkt.sname, file=pkt.file, htype=pkt.htype,
                  hlen=pkt.hlen)
