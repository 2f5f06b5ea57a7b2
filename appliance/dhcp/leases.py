"""The in-memory lease table: the authority for address allocation.

Loaded from the database at start (see ``store``), changed here per packet, and every
change that must survive a restart is queued as *dirty* for the next group commit.
Times are wall-clock seconds (``time.time()``), addresses 32-bit integers.

Rules (RFC 2131 §4.3.1):
- a reserved address is only ever given to its MAC; a MAC with a reservation on a
  subnet only gets that address there;
- a client gets its previous address back when it is still free (bound, offered,
  released or expired entries all remember the MAC);
- a bound (or held offered/declined) address is never given to another MAC before
  it expires; a released address is free at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

OFFERED = "offered"
BOUND = "bound"
RELEASED = "released"
DECLINED = "declined"


@dataclass(slots=True)
class Reservation:
    mac: str
    ip: int
    hostname: str | None = None


@dataclass(slots=True)
class SubnetInfo:
    id: int
    network: int
    prefix: int
    pool_start: int  # 0 when the subnet has no pool (reservations only)
    pool_end: int
    router: int = 0
    dns: tuple[int, ...] = ()
    domain: str = ""
    lease_seconds: int = 3600
    next_server: int = 0
    reservations: dict[str, Reservation] = field(default_factory=dict)  # by MAC
    reserved_ips: dict[int, str] = field(default_factory=dict)  # ip -> MAC
    excluded: set[int] = field(default_factory=set)  # router, appliance addresses
    cursor: int = 0
    full_until: float = 0.0  # no free address before this time (pool exhausted)
    cidr: str = ""
    #: Derived from ``network``/``prefix`` once (looked at for every packet).
    mask: int = field(init=False, repr=False, compare=False, default=0)
    broadcast: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        self.mask = (0xFFFFFFFF << (32 - self.prefix)) & 0xFFFFFFFF
        self.broadcast = self.network | (~self.mask & 0xFFFFFFFF)

    def contains(self, ip: int) -> bool:
        return (ip & self.mask) == self.network

    def add_reservation(self, r: Reservation) -> None:
        self.reservations[r.mac] = r
        self.reserved_ips[r.ip] = r.mac


@dataclass(slots=True)
class LeaseEntry:
    ip: int
    mac: str
    subnet_id: int
    state: str
    starts: float
    expires: float
    hostname: str | None = None
    client_id: str | None = None


class LeaseTable:
    def __init__(self, subnets: list[SubnetInfo] | None = None,
                 decline_hold: float = 600.0) -> None:
        self.subnets: list[SubnetInfo] = list(subnets or [])
        self.by_ip: dict[int, LeaseEntry] = {}
        self.by_mac: dict[tuple[str, int], LeaseEntry] = {}
        self.decline_hold = decline_hold
        self.dirty: list[LeaseEntry] = []
        #: address -> its subnet (or None): every packet of a relay asks for the same one
        self._subnet_of: dict[int, SubnetInfo | None] = {}

    # -- configuration ------------------------------------------------------------
    def set_subnets(self, subnets: list[SubnetInfo]) -> None:
        old = {s.id: s for s in self.subnets}
        for s in subnets:
            if s.id in old:
                s.cursor = old[s.id].cursor
                s.excluded |= old[s.id].excluded
        self.subnets = subnets
        self._subnet_of = {}

    def subnet_for(self, ip: int) -> SubnetInfo | None:
        try:
            return self._subnet_of[ip]
        except KeyError:
            pass
        found = None
        for s in self.subnets:
            if (ip & s.mask) == s.network:
                found = s
                break
        if len(self._subnet_of) >= 4096:
            self._subnet_of.clear()
        self._subnet_of[ip] = found
        return found

    def subnet_by_id(self, subnet_id: int) -> SubnetInfo | None:
        for s in self.subnets:
            if s.id == subnet_id:
                return s
        return None

    def load(self, entry: LeaseEntry) -> None:
        """Add an entry read from the database (not dirty)."""
        self.by_ip[entry.ip] = entry
        key = (entry.mac, entry.subnet_id)
        current = self.by_mac.get(key)
        if entry.state != DECLINED and (current is None or current.starts <= entry.starts):
            self.by_mac[key] = entry

    # -- queries ------------------------------------------------------------------
    def available(self, sub: SubnetInfo, ip: int, mac: str, now: float) -> bool:
        """May ``ip`` be given to ``mac`` on ``sub`` now?"""
        if not sub.contains(ip) or ip == sub.network or ip == sub.broadcast:
            return False
        owner = sub.reserved_ips.get(ip)
        if owner is not None:
            return owner == mac
        if mac in sub.reservations:
            return False
        if not sub.pool_start or not sub.pool_start <= ip <= sub.pool_end:
            return False
        if ip in sub.excluded:
            return False
        e = self.by_ip.get(ip)
        if e is None:
            return True
        if e.mac == mac and e.state != DECLINED:
            return True
        return e.expires <= now or e.state == RELEASED

    def known_binding(self, ip: int, mac: str) -> bool:
        """Do we have a record of ``mac`` holding ``ip`` (any state but declined)?"""
        e = self.by_ip.get(ip)
        return e is not None and e.mac == mac and e.state != DECLINED

    def choose(self, sub: SubnetInfo, mac: str, requested: int, now: float) -> int:
        """The address to offer ``mac`` on ``sub``; 0 when none is free."""
        r = sub.reservations.get(mac)
        if r is not None:
            return r.ip if self.available(sub, r.ip, mac, now) else 0
        prev = self.by_mac.get((mac, sub.id))
        if prev is not None and self.available(sub, prev.ip, mac, now):
            return prev.ip
        if requested and self.available(sub, requested, mac, now):
            return requested
        return self._allocate(sub, mac, now)

    def _allocate(self, sub: SubnetInfo, mac: str, now: float) -> int:
        if not sub.pool_start or sub.full_until > now:
            return 0
        start, end = sub.pool_start, sub.pool_end
        size = end - start + 1
        pos = sub.cursor if start <= sub.cursor <= end else start
        earliest = float("inf")
        by_ip = self.by_ip
        reserved = sub.reserved_ips
        excluded = sub.excluded
        net, bcast = sub.network, sub.broadcast
        for _ in range(size):
            ip = pos
            pos = pos + 1 if pos < end else start
            if ip in reserved or ip in excluded or ip == net or ip == bcast:
                continue
            e = by_ip.get(ip)
            if e is None or e.expires <= now or e.state == RELEASED:
                sub.cursor = pos
                return ip
            if e.expires < earliest:
                earliest = e.expires
        sub.full_until = min(earliest, now + 5.0)
        return 0

    # -- changes ------------------------------------------------------------------
    def _put(self, sub: SubnetInfo, ip: int, mac: str, state: str, now: float,
             expires: float, hostname: str | None, client_id: str | None) -> LeaseEntry:
        e = self.by_ip.get(ip)
        if e is None:
            e = LeaseEntry(ip, mac, sub.id, state, now, expires, hostname, client_id)
            self.by_ip[ip] = e
        else:
            if e.mac != mac:
                old = self.by_mac.get((e.mac, e.subnet_id))
                if old is e:
                    del self.by_mac[(e.mac, e.subnet_id)]
                e.mac = mac
                e.starts = now
            elif e.state not in (BOUND, OFFERED):
                e.starts = now
            e.subnet_id = sub.id
            e.state = state
            e.expires = expires
            if hostname is not None:
                e.hostname = hostname
            if client_id is not None:
                e.client_id = client_id
        if state != DECLINED:
            self.by_mac[(mac, sub.id)] = e
        return e

    def offer(self, sub: SubnetInfo, ip: int, mac: str, now: float, hold: float) -> None:
        """Hold ``ip`` for ``mac`` while the client decides (memory only)."""
        e = self.by_ip.get(ip)
        if e is not None and e.mac == mac and e.state == BOUND and e.expires > now:
            return  # still bound: an offer does not shorten the lease
        self._put(sub, ip, mac, OFFERED, now, now + hold, None, None)

    def cancel_offer(self, mac: str, sub: SubnetInfo, now: float) -> None:
        """The client chose another server: free the address we offered it."""
        e = self.by_mac.get((mac, sub.id))
        if e is not None and e.state == OFFERED:
            e.expires = now

    def bind(self, sub: SubnetInfo, ip: int, mac: str, now: float, lease_seconds: int,
             hostname: str | None = None, client_id: str | None = None) -> LeaseEntry:
        e = self._put(sub, ip, mac, BOUND, now, now + lease_seconds, hostname, client_id)
        self.dirty.append(e)
        return e

    def release(self, ip: int, mac: str, now: float) -> bool:
        e = self.by_ip.get(ip)
        if e is None or e.mac != mac or e.state not in (BOUND, OFFERED):
            return False
        e.state = RELEASED
        e.expires = now
        self.dirty.append(e)
        sub = self.subnet_by_id(e.subnet_id)
        if sub is not None:
            sub.full_until = 0.0
        return True

    def decline(self, sub: SubnetInfo, ip: int, mac: str, now: float) -> bool:
        """The client found ``ip`` in use: keep it away from everyone for a while."""
        e = self.by_ip.get(ip)
        if e is None or e.mac != mac:
            return False
        if self.by_mac.get((mac, e.subnet_id)) is e:
            del self.by_mac[(mac, e.subnet_id)]
        e.state = DECLINED
        e.expires = now + self.decline_hold
        self.dirty.append(e)
        return True

    def take_dirty(self) -> list[LeaseEntry]:
        out, self.dirty = self.dirty, []
        return out
