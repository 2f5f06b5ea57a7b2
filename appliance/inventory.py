"""Operations on subnets, reservations, machines, leases and events.

The CLI (and later the API and UI) call these; each validates its input and raises
InventoryError with a message naming the bad value.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from appliance.lifecycle import record_event
from appliance.mac import normalize_mac
from appliance.models import Event, Lease, Machine, Reservation, Subnet, utcnow


class InventoryError(ValueError):
    """A request was refused; the message says which value is wrong and why."""


_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def hostname_problem(name: str) -> str | None:
    """Why ``name`` is not an RFC 1123 host name (it goes into answer files), or None."""
    if not name or len(name) > 253:
        return "must be 1 to 253 characters"
    if not all(_LABEL.match(label) for label in name.split(".")):
        return ("must be dot-separated labels of letters, digits and '-' (1-63 each, "
                "not starting or ending with '-')")
    return None


def check_hostname(name: str | None) -> None:
    if name:
        problem = hostname_problem(name)
        if problem:
            raise InventoryError(f"hostname {name[:80]!r}: {problem}")


def _address(field: str, text: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text.strip())
    except ValueError:
        raise InventoryError(f"{field}: {text!r} is not an IPv4 address") from None


def parse_pool(network: ipaddress.IPv4Network, text: str) -> tuple[str, str]:
    """``A-B`` inside ``network``, excluding its network and broadcast addresses."""
    if "-" not in text:
        raise InventoryError(f"pool: {text!r} must be FIRST-LAST, e.g. 10.0.0.100-10.0.0.200")
    first_text, last_text = text.split("-", 1)
    first, last = _address("pool", first_text), _address("pool", last_text)
    if first > last:
        raise InventoryError(f"pool: {first} comes after {last}")
    for addr in (first, last):
        if addr not in network:
            raise InventoryError(f"pool: {addr} is not in {network}")
        if network.prefixlen < 31 and addr in (network.network_address,
                                               network.broadcast_address):
            raise InventoryError(f"pool: {addr} is the network or broadcast address")
    return str(first), str(last)


def add_subnet(session: Session, network: str, pool: str | None = None,
               router: str | None = None, dns: list[str] | None = None,
               domain: str = "", lease_seconds: int = 3600,
               next_server: str | None = None, actor: str = "cli") -> Subnet:
    try:
        net = ipaddress.IPv4Network(network.strip(), strict=True)
    except ValueError as exc:
        raise InventoryError(f"network: {network!r}: {exc}") from None
    if session.scalar(select(Subnet).where(Subnet.network == str(net))):
        raise InventoryError(f"network: {net} already exists")
    for other in session.scalars(select(Subnet)):
        if ipaddress.IPv4Network(other.network).overlaps(net):
            raise InventoryError(f"network: {net} overlaps existing subnet {other.network}")
    pool_start = pool_end = None
    if pool:
        pool_start, pool_end = parse_pool(net, pool)
    if router is not None and _address("router", router) not in net:
        raise InventoryError(f"router: {router} is not in {net}")
    dns_list = [str(_address("dns", d)) for d in (dns or [])]
    if next_server is not None:
        next_server = str(_address("next-server", next_server))
    if not 60 <= lease_seconds <= 365 * 86400:
        raise InventoryError(f"lease-time: {lease_seconds} s is outside 60 s .. 365 days")
    subnet = Subnet(network=str(net), pool_start=pool_start, pool_end=pool_end,
                    router=router, dns_servers=",".join(dns_list), domain_name=domain,
                    lease_seconds=lease_seconds, next_server=next_server)
    session.add(subnet)
    session.flush()
    record_event(session, None, actor, "subnet-added", f"subnet {net} added",
                 {"network": str(net), "pool": pool})
    return subnet


def delete_subnet(session: Session, network: str, actor: str = "cli") -> None:
    subnet = session.scalar(select(Subnet).where(Subnet.network == network))
    if subnet is None:
        raise InventoryError(f"network: no subnet {network}")
    session.delete(subnet)
    record_event(session, None, actor, "subnet-deleted", f"subnet {network} deleted")


def list_subnets(session: Session) -> list[Subnet]:
    return list(session.scalars(select(Subnet).order_by(Subnet.network)))


def add_reservation(session: Session, mac: str, ip: str, hostname: str | None = None,
                    actor: str = "cli") -> Reservation:
    try:
        mac = normalize_mac(mac)
    except ValueError as exc:
        raise InventoryError(f"mac: {exc}") from None
    check_hostname(hostname)
    addr = _address("ip", ip)
    subnet = next((s for s in list_subnets(session)
                   if addr in ipaddress.IPv4Network(s.network)), None)
    if subnet is None:
        raise InventoryError(f"ip: {addr} is in no configured subnet (add the subnet first)")
    if session.scalar(select(Reservation).where(Reservation.mac == mac)):
        raise InventoryError(f"mac: {mac} already has a reservation")
    if session.scalar(select(Reservation).where(Reservation.ip == str(addr))):
        raise InventoryError(f"ip: {addr} is already reserved")
    lease = session.scalar(select(Lease).where(Lease.ip == str(addr)))
    if (lease is not None and lease.mac != mac and lease.state in ("bound", "offered")
            and lease.expires_at > utcnow()):
        raise InventoryError(f"ip: {addr} is leased to {lease.mac} until {lease.expires_at}")
    reservation = Reservation(mac=mac, ip=str(addr), hostname=hostname, subnet=subnet)
    session.add(reservation)
    session.flush()
    record_event(session, None, actor, "reservation-added", f"{mac} reserved {addr}",
                 {"mac": mac, "ip": str(addr), "hostname": hostname})
    return reservation


def delete_reservation(session: Session, mac: str, actor: str = "cli") -> None:
    mac = normalize_mac(mac)
    reservation = session.scalar(select(Reservation).where(Reservation.mac == mac))
    if reservation is None:
        raise InventoryError(f"mac: no reservation for {mac}")
    session.delete(reservation)
    record_event(session, None, actor, "reservation-deleted", f"reservation of {mac} deleted")


def list_reservations(session: Session) -> list[Reservation]:
    return list(session.scalars(select(Reservation).order_by(Reservation.ip)))


def add_machine(session: Session, mac: str, hostname: str | None = None,
                actor: str = "cli") -> Machine:
    """Enroll a machine before it is ever seen (to set its bootenv before first boot)."""
    try:
        mac = normalize_mac(mac)
    except ValueError as exc:
        raise InventoryError(f"mac: {exc}") from None
    check_hostname(hostname)
    if session.scalar(select(Machine).where(Machine.mac == mac)):
        raise InventoryError(f"mac: machine {mac} already exists")
    now = utcnow()
    machine = Machine(mac=mac, hostname=hostname or None, state="discovered",
                      bootenv="discovery", first_seen_at=now, last_seen_at=now,
                      seen_on=None, profiles=[], params={})
    session.add(machine)
    session.flush()
    record_event(session, machine, actor, "registered", f"{mac} added by {actor}",
                 {"hostname": hostname})
    return machine


def list_machines(session: Session) -> list[Machine]:
    return list(session.scalars(select(Machine).order_by(Machine.mac)))


def list_leases(session: Session, include_inactive: bool = False) -> list[Lease]:
    query = select(Lease).order_by(Lease.ip)
    if not include_inactive:
        query = query.where(Lease.state == "bound", Lease.expires_at > utcnow())
    return list(session.scalars(query))


def list_events(session: Session, mac: str | None = None, limit: int = 100) -> list[Event]:
    query = select(Event).order_by(Event.id.desc()).limit(limit)
    if mac:
        query = query.join(Machine).where(Machine.mac == normalize_mac(mac))
    return list(reversed(list(session.scalars(query))))


#: Columns that are credentials: never shown by the CLI, the API or the UI.
SECRET_COLUMNS = frozenset({"install_token", "seed_token", "bmc_password"})


def as_dict(row: Any) -> dict[str, Any]:
    """Plain columns of a row, for JSON output (credentials left out)."""
    out = {}
    for column in row.__table__.columns:
        if column.key in SECRET_COLUMNS:
            continue
        value = getattr(row, column.key)
        out[column.key] = value.isoformat() if hasattr(value, "isoformat") else value
    return out
