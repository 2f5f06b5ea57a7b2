"""proxyDHCP (PXE 2.1 §2.2.2): boot information for PXE clients, never addresses.

Another DHCP server on the segment hands out the addresses. We answer a PXE client's
DISCOVER with an OFFER that has no ``yiaddr`` but the boot file, the server identifier,
option 60 ``PXEClient`` and PXE vendor options; the client's follow-up REQUEST to port
4011 (after it got its address elsewhere) is answered with an ACK carrying the same.
"""

from __future__ import annotations

import logging

from appliance.dhcp import replies
from appliance.dhcp.codec import DhcpPacket, DropPacket, int_to_ip
from appliance.dhcp.handler import (
    BootSteering,
    HandlerConfig,
    InterfaceNames,
    SeenSink,
    note_exchange,
)
from appliance.dhcp.handler import mac_text as _mac_text
from appliance.dhcp.options import ACK, DISCOVER, INFORM, OFFER, PXE_PORT, REQUEST, SERVER_ID
from appliance.dhcp.packets import Incoming, Outgoing
from appliance.dhcp.stats import Counters
from appliance.dhcp.steering import PXE_CLIENT, classify

log = logging.getLogger("appliance.dhcp")


class ProxyHandler:
    def __init__(self, cfg: HandlerConfig, counters: Counters,
                 seen: SeenSink | None = None) -> None:
        self.cfg = cfg
        self.counters = counters
        self.seen = seen
        self.boot = BootSteering(cfg)
        self.ifname = InterfaceNames()

    def handle(self, pkt: DhcpPacket, rx: Incoming, now: float) -> Outgoing | None:
        kind = classify(pkt.options)
        if not kind.boots:
            self.counters.inc("dropped_not_pxe")
            return None
        mt = pkt.msg_type
        server_id = rx.local_ip
        if rx.port == PXE_PORT:
            if mt not in (REQUEST, INFORM):
                raise DropPacket("other_type", f"message type {mt} on port {PXE_PORT}")
            reply_type = ACK
        elif mt == DISCOVER:
            reply_type = OFFER
        elif mt == REQUEST and pkt.ip_option(SERVER_ID) == server_id:
            reply_type = ACK
        else:
            self.counters.inc("dropped_not_for_us")
            return None
        mac = _mac_text(pkt.chaddr)
        if self.seen is not None and self.seen.due(mac):
            seen_on = (f"relay {int_to_ip(pkt.giaddr)}" if pkt.giaddr
                       else self.ifname(rx.ifindex))
            self.seen.note(mac, seen_on, kind.arch_name)
        boot = self.boot.boot_for(kind, mac, None, server_id)
        if boot is None:
            raise DropPacket("no_boot", f"no boot loader for {mac} arch {kind.arch}")
        if boot.vendor_class is None:
            boot = type(boot)(boot.kind, boot.file, boot.next_server, PXE_CLIENT)
        body, file = replies.boot_options(boot, pkt)
        payload = replies.build(pkt, reply_type, server_id, siaddr=boot.next_server,
                                body=body, file=file)
        if reply_type == ACK:
            self.counters.inc("acks")
        else:
            self.counters.inc("offers")
        note_exchange(self.seen, mac, "ack" if reply_type == ACK else "offer",
                      pkt.ciaddr or (rx.src_ip if rx.port == PXE_PORT else 0), boot)
        if rx.port == PXE_PORT:
            dst = rx.src_ip or pkt.ciaddr
            return Outgoing(payload, dst, rx.src_port, rx.port, server_id, 0)
        return replies.route(pkt, rx, reply_type, 0, payload, server_id)
