"""Sockets: receive with the arrival interface and time, send by the RFC 2131 rules.

- One UDP socket per port (67, and 4011 in proxy mode), bound to ``dhcp.bind``,
  optionally to ``dhcp.interface`` (SO_BINDTODEVICE), with IP_PKTINFO (which interface
  and local address a packet came in on), SO_TIMESTAMP (kernel arrival time, to drop
  stale work under overload) and a large receive buffer.
- Broadcasts go out of the receiving interface (IP_PKTINFO on sendmsg).
- A client without an address whose broadcast flag is clear is answered by link-layer
  unicast to its hardware address (RFC 2131 §4.1) through an AF_PACKET socket: we build
  the IPv4/UDP headers ourselves. Without CAP_NET_RAW we broadcast instead.
"""

from __future__ import annotations

import array
import errno
import logging
import socket
import struct
import sys

from appliance.dhcp.packets import Incoming, Outgoing

log = logging.getLogger("appliance.dhcp")

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
SO_TIMESTAMP = getattr(socket, "SO_TIMESTAMP", 29)
SO_RCVBUFFORCE = 33
RECV_BUFFER = 4096  # larger than any packet we accept: MSG_TRUNC tells oversized ones
RCVBUF_BYTES = 32 * 1024 * 1024
_PKTINFO = struct.Struct("=i4s4s")
_TIMEVAL = struct.Struct("=qq")
_CMSG_SPACE = socket.CMSG_SPACE(_PKTINFO.size) + socket.CMSG_SPACE(_TIMEVAL.size)
_IP_HDR = struct.Struct("!BBHHHBBH4s4s")
_UDP_HDR = struct.Struct("!HHHH")
_ETH_P_IP = 0x0800
_LITTLE = sys.byteorder == "little"


def _checksum(data: bytes) -> int:
    """Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(array.array("H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    total = ~total & 0xFFFF
    if _LITTLE:
        total = ((total & 0xFF) << 8) | (total >> 8)
    return total


def ip_udp_packet(payload: bytes, src: int, dst: int, sport: int, dport: int) -> bytes:
    """An IPv4 + UDP datagram with correct checksums."""
    src_b, dst_b = src.to_bytes(4, "big"), dst.to_bytes(4, "big")
    udp_len = 8 + len(payload)
    pseudo = src_b + dst_b + struct.pack("!BBH", 0, socket.IPPROTO_UDP, udp_len)
    udp = _UDP_HDR.pack(sport, dport, udp_len, 0) + payload
    csum = _checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + csum.to_bytes(2, "big") + udp[8:]
    hdr = _IP_HDR.pack(0x45, 0x10, 20 + udp_len, 0, 0, 64, socket.IPPROTO_UDP, 0, src_b, dst_b)
    hdr = hdr[:10] + _checksum(hdr).to_bytes(2, "big") + hdr[12:]
    return hdr + udp


class Transport:
    def __init__(self, bind: str, ports: list[int], interface: str = "") -> None:
        self.socks: dict[int, socket.socket] = {}
        self.interface = interface
        for port in ports:
            self.socks[port] = self._open(bind, port, interface)
        self.raw: socket.socket | None = None
        try:
            self.raw = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
        except OSError as exc:
            log.warning("no AF_PACKET socket (%s): replies to clients without an address "
                        "are broadcast", exc)
        self._ifnames: dict[int, str] = {}

    @staticmethod
    def _open(bind: str, port: int, interface: str) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF_BYTES)
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
        if interface:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        s.bind((bind, port))
        s.setblocking(False)
        log.info("listening on %s:%d%s (receive buffer %d bytes)", bind, port,
                 f" on {interface}" if interface else "",
                 s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
        return s

    def close(self) -> None:
        for s in self.socks.values():
            s.close()
        if self.raw is not None:
            self.raw.close()

    def drain(self, port: int, out: list[Incoming], limit: int) -> int:
        """Read up to ``limit`` datagrams from the socket of ``port`` without blocking."""
        sock = self.socks[port]
        recvmsg = sock.recvmsg
        n = 0
        ip_level, pktinfo = socket.IPPROTO_IP, IP_PKTINFO
        while n < limit:
            try:
                data, anc, flags, addr = recvmsg(RECV_BUFFER, _CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # e.g. ICMP errors reported on the socket
                if exc.errno in (errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH):
                    continue
                raise
            ifindex = 0
            local = 0
            rx_time = 0.0
            for level, kind, cdata in anc:
                if level == ip_level and kind == pktinfo:
                    ifindex, spec_dst, _dst = _PKTINFO.unpack_from(cdata)
                    local = int.from_bytes(spec_dst, "big")
                elif kind == SO_TIMESTAMP:
                    sec, usec = _TIMEVAL.unpack_from(cdata)
                    rx_time = sec + usec * 1e-6
            if flags & socket.MSG_TRUNC:
                data = data + b"\x00" * (RECV_BUFFER + 1 - len(data))  # mark as oversized
            src_ip = int.from_bytes(socket.inet_aton(addr[0]), "big")
            out.append(Incoming(data, src_ip, addr[1], ifindex, local, port, rx_time))
            n += 1
        return n

    def _ifname(self, ifindex: int) -> str:
        name = self._ifnames.get(ifindex)
        if name is None:
            name = socket.if_indextoname(ifindex)
            self._ifnames[ifindex] = name
        return name

    def send(self, out: Outgoing) -> None:
        """Send one reply; raises OSError on failure."""
        if out.l2_dst is not None and self.raw is not None and out.ifindex:
            packet = ip_udp_packet(out.payload, out.src_ip, out.dst_ip, out.src_port,
                                   out.dst_port)
            self.raw.sendto(packet, (self._ifname(out.ifindex), _ETH_P_IP, 0, 0, out.l2_dst))
            return
        sock = self.socks.get(out.src_port) or next(iter(self.socks.values()))
        dst_ip = out.dst_ip
        if out.l2_dst is not None:  # no raw socket: fall back to broadcast
            dst_ip = 0xFFFFFFFF
        dst = socket.inet_ntoa(dst_ip.to_bytes(4, "big"))
        if out.ifindex or out.src_ip:
            info = _PKTINFO.pack(out.ifindex, out.src_ip.to_bytes(4, "big"), b"\x00" * 4)
            sock.sendmsg([out.payload], [(socket.IPPROTO_IP, IP_PKTINFO, info)],
                         0, (dst, out.dst_port))
        else:
            sock.sendto(out.payload, (dst, out.dst_port))
