"""What the server receives and sends, independent of sockets."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Incoming:
    """One received datagram and where it came from."""

    data: bytes
    src_ip: int
    src_port: int
    ifindex: int  # receiving interface (IP_PKTINFO); 0 when unknown
    local_ip: int  # our address the packet arrived on (ipi_spec_dst)
    port: int  # our port it arrived on (67, or 4011 in proxy mode)
    rx_time: float  # kernel receive time, wall clock seconds


@dataclass(slots=True)
class Outgoing:
    """One reply and how to deliver it (RFC 2131 §4.1)."""

    payload: bytes
    dst_ip: int
    dst_port: int
    src_port: int
    src_ip: int  # our address on the segment (source of the reply)
    ifindex: int  # interface for broadcasts and link-layer unicasts
    #: Link-layer destination for a client that has no address yet (unicast to
    #: chaddr/yiaddr); None sends through the UDP socket.
    l2_dst: bytes | None = None
    #: The reply confirms a lease: send it only after the lease is committed.
    durable: bool = False
