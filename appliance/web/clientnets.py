"""Is a client's address inside a configured list of networks (``http.*_networks``)?"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=16)
def parse_networks(spec: str) -> tuple[Network, ...]:
    """``"10.0.0.0/8, ::1"`` -> networks; the config checked the syntax when it loaded."""
    return tuple(ipaddress.ip_network(p.strip(), strict=False)
                 for p in spec.split(",") if p.strip())


def client_in(remote_addr: str | None, spec: str) -> bool:
    """True when ``remote_addr`` is in one of the networks of ``spec``. An IPv4-mapped
    IPv6 address (``::ffff:127.0.0.1``, from a dual-stack bind) counts as its IPv4
    address; a missing or unparsable address is in no network."""
    try:
        client = ipaddress.ip_address(remote_addr or "")
    except ValueError:
        return False
    if isinstance(client, ipaddress.IPv6Address) and client.ipv4_mapped:
        client = client.ipv4_mapped
    return any(client in net for net in parse_networks(spec))
