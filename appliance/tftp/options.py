"""Option negotiation for read requests: blksize (RFC 2348), tsize and timeout (RFC 2349).

Requests are parsed and OACKs encoded by tftpy's packet classes; this module only
decides which of the client's options are accepted, following RFC 2347: an option the
server does not support, or whose value is invalid, is left out of the OACK, and if
nothing is left the transfer starts without an OACK.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tftpy.TftpPacketTypes import TftpPacketOACK

MIN_BLKSIZE = 8
MAX_BLKSIZE = 65464      # RFC 2348: largest block that fits a UDP datagram over IPv4
DEFAULT_BLKSIZE = 512


@dataclass
class Negotiated:
    blksize: int = DEFAULT_BLKSIZE
    timeout: float | None = None            # None: the server's configured timeout
    #: Options to acknowledge, in the client's order, values as strings.
    accepted: dict[str, str] = field(default_factory=dict)


def _int(value: str) -> int | None:
    value = value.strip()
    if not value.isdigit() or len(value) > 12:
        return None
    return int(value)


def negotiate(requested: dict[str, str], size: int, max_blksize: int = MAX_BLKSIZE) -> Negotiated:
    """Decide the options for a read of ``size`` bytes (the bytes actually sent)."""
    out = Negotiated()
    max_blksize = max(MIN_BLKSIZE, min(max_blksize, MAX_BLKSIZE))
    for name, value in requested.items():
        key = name.lower()
        number = _int(value)
        if key == "blksize":
            if number is None or number < MIN_BLKSIZE:
                continue
            out.blksize = min(number, max_blksize)
            out.accepted["blksize"] = str(out.blksize)
        elif key == "tsize":
            # In a read request the client sends 0 and the server answers the size.
            if number is None:
                continue
            out.accepted["tsize"] = str(size)
        elif key == "timeout":
            if number is None or not 1 <= number <= 255:
                continue
            out.timeout = float(number)
            out.accepted["timeout"] = str(number)
    return out


def encode_oack(accepted: dict[str, str]) -> bytes:
    """The OACK datagram for ``accepted``, encoded by tftpy."""
    pkt = TftpPacketOACK()
    pkt.options = accepted
    return pkt.encode().buffer
