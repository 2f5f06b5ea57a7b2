"""The full DHCP server: DISCOVER/REQUEST/DECLINE/RELEASE/INFORM per RFC 2131 §4.3."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import Protocol

from appliance.dhcp import replies
from appliance.dhcp.codec import DhcpPacket, DropPacket, int_to_ip
from appliance.dhcp.leases import LeaseTable, SubnetInfo
from appliance.dhcp.options import (
    ACK,
    CLIENT_ID,
    DECLINE,
    DISCOVER,
    HOSTNAME,
    INFORM,
    NAK,
    OFFER,
    RELEASE,
    REQUEST,
    REQUESTED_ADDRESS,
    SERVER_ID,
)
from appliance.dhcp.packets import Incoming, Outgoing
from appliance.dhcp.stats import Counters
from appliance.dhcp.steering import BootInfo, ClientKind, SteeringConfig, classify, steer
from appliance.mac import normalize_mac

log = logging.getLogger("appliance.dhcp")

class SeenSink(Protocol):
    """Where clients seen are reported (``background.SeenRecorder``)."""

    watched: frozenset[str]

    def due(self, mac: str) -> bool: ...
    def note(self, mac: str, seen_on: str, arch: str | None) -> None: ...
    def exchange(self, mac: str, reply: str, address: str, boot: str) -> None: ...


def note_exchange(seen: SeenSink | None, mac: str, reply: str, ip: int,
                  boot: BootInfo | None) -> None:
    """Report a reply to a machine being provisioned (its boot timeline); a set lookup
    for every other client."""
    if seen is not None and mac in seen.watched:
        seen.exchange(mac, reply, int_to_ip(ip) if ip else "", boot.file if boot else "")


@dataclass(slots=True)
class HandlerConfig:
    steering: SteeringConfig
    public_address: str = ""
    offer_hold_seconds: int = 30


def mac_text(chaddr: bytes) -> str:
    """The client's MAC from the 16-byte chaddr field (Ethernet: the first 6)."""
    return normalize_mac(chaddr[:6])


class InterfaceNames:
    """ifindex -> name, cached."""

    def __init__(self) -> None:
        self._names: dict[int, str] = {}

    def __call__(self, ifindex: int) -> str:
        name = self._names.get(ifindex)
        if name is None:
            try:
                name = socket.if_indextoname(ifindex) if ifindex else "unknown"
            except OSError:
                name = f"if{ifindex}"
            self._names[ifindex] = name
        return name


class BootSteering:
    """Boot information for a client, with the appliance address rules of the brief."""

    def __init__(self, cfg: HandlerConfig) -> None:
        self.cfg = cfg

    def boot_for(self, kind: ClientKind, mac: str, sub: SubnetInfo | None,
                 local_ip: int) -> BootInfo | None:
        if not kind.boots:
            return None
        next_server = sub.next_server if sub is not None and sub.next_server else local_ip
        url_host = self.cfg.public_address or int_to_ip(next_server)
        return steer(kind, mac, self.cfg.steering, next_server, url_host)


class ServerHandler:
    """Hands out addresses from the subnets in the lease table."""

    def __init__(self, table: LeaseTable, cfg: HandlerConfig, counters: Counters,
                 seen: SeenSink | None = None) -> None:
        self.table = table
        self.cfg = cfg
        self.counters = counters
        self.seen = seen
        self.boot = BootSteering(cfg)
        self.ifname = InterfaceNames()
        self._sub_opts: dict[int, tuple[SubnetInfo, bytes, bytes]] = {}
        self._prefixes: dict[tuple[int, int, int], tuple[SubnetInfo, bytes]] = {}
        self._no_subnet_logged: set[str] = set()

    # -- helpers ------------------------------------------------------------------
    def _opts(self, sub: SubnetInfo) -> tuple[bytes, bytes]:
        cached = self._sub_opts.get(sub.id)
        if cached is None or cached[0] is not sub:
            cached = (sub, replies.subnet_options(sub), replies.lease_options(sub.lease_seconds))
            self._sub_opts[sub.id] = cached
        return cached[1], cached[2]

    def select_subnet(self, pkt: DhcpPacket, rx: Incoming, mt: int) -> SubnetInfo | None:
        table = self.table
        if pkt.giaddr:
            return table.subnet_for(pkt.giaddr)
        if pkt.ciaddr and mt in (REQUEST, INFORM, RELEASE, DECLINE):
            sub = table.subnet_for(pkt.ciaddr)
            if sub is not None:
                return sub
        return table.subnet_for(rx.local_ip) if rx.local_ip else None

    def _no_subnet(self, pkt: DhcpPacket, rx: Incoming) -> None:
        self.counters.inc("dropped_no_subnet")
        where = f"relay {int_to_ip(pkt.giaddr)}" if pkt.giaddr else (
            f"{self.ifname(rx.ifindex)} ({int_to_ip(rx.local_ip)})")
        if not self.table.subnets:
            where = "*"
        if where not in self._no_subnet_logged:
            self._no_subnet_logged.add(where)
            if where == "*":
                log.warning("no subnet configured: handing out no addresses")
            else:
                log.warning("no subnet configured for requests via %s: not answering", where)

    def seen_on(self, pkt: DhcpPacket, rx: Incoming) -> str:
        if pkt.giaddr:
            return f"relay {int_to_ip(pkt.giaddr)}"
        return self.ifname(rx.ifindex)

    # -- entry point ------------------------------------------------------------------
    def handle(self, pkt: DhcpPacket, rx: Incoming, now: float) -> Outgoing | None:
        mt = pkt.msg_type
        sub = self.select_subnet(pkt, rx, mt)
        if sub is None:
            self._no_subnet(pkt, rx)
            return None
        server_id = rx.local_ip
        if server_id and sub.contains(server_id) and server_id not in sub.excluded:
            sub.excluded.add(server_id)
        mac = mac_text(pkt.chaddr)
        if mt == DISCOVER:
            return self._discover(pkt, rx, sub, mac, server_id, now)
        if mt == REQUEST:
            return self._request(pkt, rx, sub, mac, server_id, now)
        if mt == RELEASE:
            if self.table.release(pkt.ciaddr, mac, now):
                log.info("released %s by %s", int_to_ip(pkt.ciaddr), mac)
            return None
        if mt == DECLINE:
            ip = pkt.ip_option(REQUESTED_ADDRESS)
            if ip and self.table.decline(sub, ip, mac, now):
                log.warning("%s declined %s (address in use?): held back", mac, int_to_ip(ip))
            return None
        if mt == INFORM:
            return self._inform(pkt, rx, sub, mac, server_id)
        raise DropPacket("other_type", f"message type {mt}")

    def _kind_and_boot(self, pkt: DhcpPacket, rx: Incoming, sub: SubnetInfo,
                       mac: str) -> BootInfo | None:
        kind = classify(pkt.options)
        if self.seen is not None and self.seen.due(mac):
            self.seen.note(mac, self.seen_on(pkt, rx), kind.arch_name)
        return self.boot.boot_for(kind, mac, sub, rx.local_ip)

    def _lease_prefix(self, sub: SubnetInfo, mt: int, server_id: int) -> bytes:
        """Options 53, 54, lease times and the subnet's options, encoded once per subnet,
        message type and server address."""
        key = (sub.id, mt, server_id)
        cached = self._prefixes.get(key)
        if cached is None or cached[0] is not sub:
            sub_opts, lease_opts = self._opts(sub)
            if len(self._prefixes) > 1024:
                self._prefixes.clear()
            cached = self._prefixes[key] = (
                sub, replies.leading_options(mt, server_id) + lease_opts + sub_opts)
        return cached[1]

    def _lease_reply(self, pkt: DhcpPacket, rx: Incoming, sub: SubnetInfo, mac: str,
                     mt: int, ip: int, server_id: int, boot: BootInfo | None) -> Outgoing:
        opts = self._lease_prefix(sub, mt, server_id)
        if boot is None:
            file = b""
            siaddr = 0
        else:
            boot_opts, file = replies.boot_options(boot, pkt)
            opts += boot_opts
            siaddr = boot.next_server
        hostname = None
        if sub.reservations:
            r = sub.reservations.get(mac)
            if r is not None and r.ip == ip:
                hostname = r.hostname
        payload = replies.finish(pkt, mt, opts, ip, siaddr, file, hostname)
        return replies.route(pkt, rx, mt, ip, payload, server_id, durable=(mt == ACK))

    def _discover(self, pkt: DhcpPacket, rx: Incoming, sub: SubnetInfo, mac: str,
                  server_id: int, now: float) -> Outgoing | None:
        ip = self.table.choose(sub, mac, pkt.ip_option(REQUESTED_ADDRESS), now)
        if not ip:
            self.counters.inc("dropped_pool_exhausted")
            raise DropPacket("pool_exhausted", f"no free address in {sub.cidr} for {mac}")
        self.table.offer(sub, ip, mac, now, self.cfg.offer_hold_seconds)
        boot = self._kind_and_boot(pkt, rx, sub, mac)
        self.counters["offers"] += 1
        note_exchange(self.seen, mac, "offer", ip, boot)
        return self._lease_reply(pkt, rx, sub, mac, OFFER, ip, server_id, boot)

    def _nak(self, pkt: DhcpPacket, rx: Incoming, server_id: int, why: str) -> Outgoing:
        self.counters.inc("naks")
        mac = mac_text(pkt.chaddr)
        log.info("NAK to %s: %s", mac, why)
        note_exchange(self.seen, mac, f"nak ({why})", 0, None)
        payload = replies.build(pkt, NAK, server_id, message=why)
        return replies.route(pkt, rx, NAK, 0, payload, server_id)

    def _request(self, pkt: DhcpPacket, rx: Incoming, sub: SubnetInfo, mac: str,
                 server_id: int, now: float) -> Outgoing | None:
        table = self.table
        sid = pkt.ip_option(SERVER_ID)
        requested = pkt.ip_option(REQUESTED_ADDRESS)
        if sid:
            # SELECTING: the client answers an OFFER (ours or another server's).
            if sid != server_id:
                table.cancel_offer(mac, sub, now)
                raise DropPacket("not_for_us", "client selected another server")
            ip = requested or pkt.ciaddr
            if not ip:
                raise DropPacket("bad_request", "SELECTING request without address")
            if not table.available(sub, ip, mac, now):
                return self._nak(pkt, rx, server_id, f"{int_to_ip(ip)} is not available")
        elif not pkt.ciaddr:
            # INIT-REBOOT: the client asks to keep an address it remembers.
            ip = requested
            if not ip:
                raise DropPacket("bad_request", "INIT-REBOOT request without address")
            if not sub.contains(ip):
                return self._nak(pkt, rx, server_id, f"{int_to_ip(ip)} is on the wrong network")
            if not table.available(sub, ip, mac, now):
                return self._nak(pkt, rx, server_id, f"{int_to_ip(ip)} is not available")
            r = sub.reservations.get(mac)
            if not table.known_binding(ip, mac) and not (r is not None and r.ip == ip):
                # RFC 2131 §4.3.2: no record of this client: remain silent.
                raise DropPacket("not_for_us", "INIT-REBOOT from a client we have no record of")
        else:
            # RENEWING (unicast) or REBINDING (broadcast): extend ciaddr.
            ip = pkt.ciaddr
            if not sub.contains(ip) or not table.available(sub, ip, mac, now):
                return self._nak(pkt, rx, server_id, f"{int_to_ip(ip)} is not yours")
        hostname = pkt.options.get(HOSTNAME)
        client_id = pkt.options.get(CLIENT_ID)
        table.bind(sub, ip, mac, now, sub.lease_seconds,
                   hostname.decode(errors="replace")[:255] if hostname else None,
                   client_id.hex()[:255] if client_id else None)
        boot = self._kind_and_boot(pkt, rx, sub, mac)
        self.counters["acks"] += 1
        note_exchange(self.seen, mac, "ack", ip, boot)
        return self._lease_reply(pkt, rx, sub, mac, ACK, ip, server_id, boot)

    def _inform(self, pkt: DhcpPacket, rx: Incoming, sub: SubnetInfo, mac: str,
                server_id: int) -> Outgoing:
        sub_opts, _ = self._opts(sub)
        boot = self._kind_and_boot(pkt, rx, sub, mac)
        boot_opts, file = replies.boot_options(boot, pkt)
        payload = replies.build(pkt, ACK, server_id, siaddr=boot.next_server if boot else 0,
                                body=sub_opts + boot_opts, file=file)
        self.counters.inc("acks")
        return replies.route(pkt, rx, ACK, 0, payload, server_id)
