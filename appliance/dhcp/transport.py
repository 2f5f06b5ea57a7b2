"""Sockets: receive with the arrival interface and time, send by the RFC 2131 rules.

- One UDP socket per port (67, and 4011 in proxy mode), bound to ``dhcp.bind``,
  optionally to ``dhcp.interface`` (SO_BINDTODEVICE), with IP_PKTINFO (which interface
  and local address a packet came in on) and SO_TIMESTAMP (kernel arrival time, to drop
  stale work).
- Port 67 gets a second socket that receives only DISCOVERs: a classic BPF socket
  filter on each socket splits the traffic (broadcasts reach both sockets, each keeps
  its kind), and a SO_REUSEPORT BPF program steers unicasts (relays) the same way. The
  DISCOVER socket has a small receive buffer (a fraction of a second at the highest
  rate we answer): under a flood the kernel sheds the excess DISCOVERs for free,
  before we spend any CPU reading them, while REQUESTs (which finish exchanges) wait
  in their own socket and are never crowded out. Without BPF (or SO_REUSEPORT) one
  socket with a modest buffer takes everything.
- Broadcasts go out of the receiving interface (IP_PKTINFO on sendmsg).
- A client without an address whose broadcast flag is clear is answered by link-layer
  unicast to its hardware address (RFC 2131 §4.1) through an AF_PACKET socket: we build
  the IPv4/UDP headers ourselves. Without CAP_NET_RAW we broadcast instead.
"""

from __future__ import annotations

import array
import ctypes
import errno
import logging
import os
import socket
import struct
import sys

from appliance.dhcp.packets import Incoming, Outgoing

log = logging.getLogger("appliance.dhcp")

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
SO_TIMESTAMP = getattr(socket, "SO_TIMESTAMP", 29)
SO_RCVBUFFORCE = 33
SO_ATTACH_FILTER = 26
SO_ATTACH_REUSEPORT_CBPF = 51
RECV_BUFFER = 4096  # larger than any packet we accept: MSG_TRUNC tells oversized ones
#: Receive buffer of the socket that gets everything but DISCOVERs (REQUESTs come no
#: faster than we send OFFERs, so this only has to absorb bursts). The kernel doubles
#: the value it is given; a datagram costs 1-2 KiB of it.
RCVBUF_BYTES = 1024 * 1024
#: Receive buffer of the DISCOVER socket: what is not read within a few tens of
#: milliseconds is shed by the kernel (an exchange started late would not finish).
DISCOVER_RCVBUF_BYTES = 128 * 1024
_MSG_TRUNC = int(socket.MSG_TRUNC)
_IPPROTO_IP = int(socket.IPPROTO_IP)
_SOL_SOCKET = int(socket.SOL_SOCKET)
_PKTINFO = struct.Struct("=i4s4s")
#: struct in_pktinfo read as (ifindex, ipi_spec_dst as a native-order int)
_PKTINFO_INT = struct.Struct("=iI")
_ntohl = socket.ntohl
#: sender address text -> int (the packet loop sees the same few relays again and again)
_ADDR_INTS: dict[str, int] = {}
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


# Classic BPF: is this a DISCOVER? (option 53 as the first option, like peek_message_type)
_LDB, _JEQ, _RET = 0x30, 0x15, 0x06  # BPF_LD|BPF_B|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|K


def _is_discover_program(offset: int, yes: int, no: int) -> list[tuple[int, int, int, int]]:
    """``yes`` for a DHCP DISCOVER whose payload starts at ``offset``, else ``no`` (also for
    packets too short to hold option 53: a load beyond the end returns 0 = drop, hence
    the length check that ``no`` must survive)."""
    return [
        (0x80, 0, 0, 0),  # BPF_LD|BPF_W|BPF_LEN: A = packet length
        (0x35, 0, 5, offset + 243),  # BPF_JMP|BPF_JGE|BPF_K: long enough? else -> no
        (_LDB, 0, 0, offset + 240),
        (_JEQ, 0, 3, 53),
        (_LDB, 0, 0, offset + 242),
        (_JEQ, 0, 1, 1),
        (_RET, 0, 0, yes),
        (_RET, 0, 0, no),
    ]


def _fprog(program: list[tuple[int, int, int, int]]) -> tuple[bytes, object]:
    """A ``struct sock_fprog`` for setsockopt and the buffer it points to (keep it alive
    until the call returns)."""
    code = b"".join(struct.pack("=HBBI", *ins) for ins in program)
    buf = ctypes.create_string_buffer(code, len(code))
    return struct.pack("@HP", len(program), ctypes.addressof(buf)), buf


ACCEPT = 0xFFFFFFFF
#: Socket filters see the UDP header first (8 bytes); the reuseport program the payload.
_ONLY_DISCOVERS = _is_discover_program(8, ACCEPT, 0)
_NO_DISCOVERS = _is_discover_program(8, 0, ACCEPT)
_STEER = _is_discover_program(0, 1, 0)  # index in the reuseport group: 1 = DISCOVER socket


class Transport:
    def __init__(self, bind: str, ports: list[int], interface: str = "") -> None:
        #: port -> the socket that receives everything (but DISCOVERs when split) and sends
        self.socks: dict[int, socket.socket] = {}
        #: port -> the socket that receives only DISCOVERs (port 67 when the split works)
        self.discover_socks: dict[int, socket.socket] = {}
        self.interface = interface
        for i, port in enumerate(ports):
            if i == 0:
                self._open_split(bind, port, interface)
            else:
                self.socks[port] = self._open(bind, port, interface)
        self.raw: socket.socket | None = None
        try:
            self.raw = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
        except OSError as exc:
            log.warning("no AF_PACKET socket (%s): replies to clients without an address "
                        "are broadcast", exc)
        self._ifnames: dict[int, str] = {}
        self._dst_text: dict[int, str] = {}
        self._pktinfo: dict[tuple[int, int], list[tuple[int, int, bytes]]] = {}

    def _open_split(self, bind: str, port: int, interface: str) -> None:
        """The socket of ``port`` plus its DISCOVER-only twin, or one socket if the kernel
        will not do the split."""
        main = disc = None
        try:
            main = self._open(bind, port, interface, RCVBUF_BYTES, _NO_DISCOVERS, quiet=True)
            disc = self._open(bind, port, interface, DISCOVER_RCVBUF_BYTES, _ONLY_DISCOVERS,
                              quiet=True)
            fprog, buf = _fprog(_STEER)
            main.setsockopt(_SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
            del buf
        except OSError as exc:
            for s in (main, disc):
                if s is not None:
                    s.close()
            if isinstance(exc, PermissionError) or exc.errno == errno.EADDRINUSE:
                raise
            log.warning("no separate DISCOVER socket (%s): one socket takes everything", exc)
            self.socks[port] = self._open(bind, port, interface, RCVBUF_BYTES, None)
            return
        self.socks[port] = main
        self.discover_socks[port] = disc
        log.info("listening on %s:%d%s (receive buffers %d bytes, DISCOVERs %d bytes)",
                 bind, port, f" on {interface}" if interface else "",
                 main.getsockopt(_SOL_SOCKET, socket.SO_RCVBUF),
                 disc.getsockopt(_SOL_SOCKET, socket.SO_RCVBUF))

    @staticmethod
    def _open(bind: str, port: int, interface: str, rcvbuf: int = RCVBUF_BYTES,
              program: list[tuple[int, int, int, int]] | None = None,
              quiet: bool = False) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.setsockopt(_SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(_SOL_SOCKET, socket.SO_BROADCAST, 1)
            s.setsockopt(_IPPROTO_IP, IP_PKTINFO, 1)
            s.setsockopt(_SOL_SOCKET, SO_TIMESTAMP, 1)
            try:
                s.setsockopt(_SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except OSError:
                s.setsockopt(_SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            if interface:
                s.setsockopt(_SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
            if program is not None:
                s.setsockopt(_SOL_SOCKET, socket.SO_REUSEPORT, 1)
                fprog, buf = _fprog(program)
                s.setsockopt(_SOL_SOCKET, SO_ATTACH_FILTER, fprog)
                del buf
            s.bind((bind, port))
            s.setblocking(False)
        except BaseException:
            s.close()
            raise
        if not quiet:
            log.info("listening on %s:%d%s (receive buffer %d bytes)", bind, port,
                     f" on {interface}" if interface else "",
                     s.getsockopt(_SOL_SOCKET, socket.SO_RCVBUF))
        return s

    def receivers(self) -> list[tuple[socket.socket, int, bool]]:
        """(socket, port, DISCOVERs only?) for every receiving socket."""
        out = [(s, port, False) for port, s in self.socks.items()]
        out += [(s, port, True) for port, s in self.discover_socks.items()]
        return out

    def kernel_drops(self) -> int | None:
        """Datagrams the kernel dropped at our sockets (full receive buffer), from
        /proc/net/udp; None when unknown."""
        inodes = {os.fstat(s.fileno()).st_ino for s, _p, _d in self.receivers()}
        total = 0
        try:
            with open("/proc/net/udp") as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if len(fields) >= 13 and int(fields[9]) in inodes:
                        total += int(fields[12])
        except (OSError, ValueError, StopIteration):
            return None
        return total

    def close(self) -> None:
        for s, _port, _d in self.receivers():
            s.close()
        if self.raw is not None:
            self.raw.close()

    def drain(self, port: int, out: list[Incoming], limit: int) -> int:
        """Read up to ``limit`` datagrams from the (main) socket of ``port``."""
        return self.read(self.socks[port], port, out, limit)

    @staticmethod
    def read(sock: socket.socket, port: int, out: list[Incoming], limit: int) -> int:
        """Read up to ``limit`` datagrams from ``sock`` without blocking."""
        recvmsg = sock.recvmsg
        append = out.append
        addr_ints = _ADDR_INTS
        n = 0
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
                if kind == IP_PKTINFO and level == _IPPROTO_IP:
                    ifindex, local = _PKTINFO_INT.unpack_from(cdata)
                elif kind == SO_TIMESTAMP and level == _SOL_SOCKET:
                    sec, usec = _TIMEVAL.unpack_from(cdata)
                    rx_time = sec + usec * 1e-6
            if flags & _MSG_TRUNC:
                data = data + b"\x00" * (RECV_BUFFER + 1 - len(data))  # mark as oversized
            src_text, src_port = addr
            src_ip = addr_ints.get(src_text)
            if src_ip is None:
                if len(addr_ints) > 4096:
                    addr_ints.clear()
                src_ip = addr_ints[src_text] = int.from_bytes(socket.inet_aton(src_text), "big")
            append(Incoming(data, src_ip, src_port, ifindex, _ntohl(local), port, rx_time))
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
        dst = self._dst_text.get(dst_ip)
        if dst is None:
            if len(self._dst_text) > 4096:
                self._dst_text.clear()
            dst = self._dst_text[dst_ip] = socket.inet_ntoa(dst_ip.to_bytes(4, "big"))
        if out.ifindex or out.src_ip:
            key = (out.ifindex, out.src_ip)
            anc = self._pktinfo.get(key)
            if anc is None:
                if len(self._pktinfo) > 1024:
                    self._pktinfo.clear()
                info = _PKTINFO.pack(out.ifindex, out.src_ip.to_bytes(4, "big"), b"\x00" * 4)
                anc = self._pktinfo[key] = [(_IPPROTO_IP, IP_PKTINFO, info)]
            sock.sendmsg([out.payload], anc, 0, (dst, out.dst_port))
        else:
            sock.sendto(out.payload, (dst, out.dst_port))
