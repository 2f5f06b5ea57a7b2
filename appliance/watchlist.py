"""Which machines are being provisioned now, for the boot path's timeline events.

The DHCP, TFTP and HTTP parts write an event per exchange only for these machines (a
machine in service renewing its lease every few minutes is not news). They ask here
every few seconds, never per packet: DHCP keeps a set of MACs, TFTP and HTTP a map of
the addresses those machines hold (their live leases), because TFTP and file requests
carry no MAC.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from appliance.lifecycle.states import INSTALLING, PROVISIONING
from appliance.models import Lease, Machine

log = logging.getLogger("appliance.timeline")

#: States whose machines get timeline events.
WATCHED_STATES = (PROVISIONING, INSTALLING)
#: Seconds a watch list is used before it is read again.
REFRESH_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class Watched:
    machine_id: int
    mac: str
    bootenv: str


def provisioning_macs(session: Session) -> frozenset[str]:
    return frozenset(session.scalars(
        select(Machine.mac).where(Machine.state.in_(WATCHED_STATES))))


def provisioning_addresses(session: Session) -> dict[str, Watched]:
    """Address -> machine, from the live leases of the machines being provisioned."""
    rows = session.execute(
        select(Lease.ip, Machine.id, Machine.mac, Machine.bootenv)
        .join(Machine, Machine.mac == Lease.mac)
        .where(Machine.state.in_(WATCHED_STATES), Lease.state.in_(("bound", "offered"))))
    return {ip: Watched(mid, mac, bootenv) for ip, mid, mac, bootenv in rows}


class AddressWatch:
    """``provisioning_addresses`` read at most every REFRESH_SECONDS; thread-safe.

    A failed read keeps the last answer (the database may be busy for a moment): the
    timeline is a convenience and must never fail a transfer.
    """

    def __init__(self, session_factory: Callable[[], AbstractContextManager[Session]],
                 refresh: float = REFRESH_SECONDS) -> None:
        self._session_factory = session_factory
        self._refresh = refresh
        self._lock = threading.Lock()
        self._addresses: dict[str, Watched] = {}
        self._read_at = -refresh
        self._warned_at = -60.0

    def lookup(self, address: str | None) -> Watched | None:
        if not address:
            return None
        now = time.monotonic()
        if now - self._read_at >= self._refresh and self._lock.acquire(blocking=False):
            try:
                self._read_at = now
                with self._session_factory() as session:
                    self._addresses = provisioning_addresses(session)
            except Exception as exc:  # noqa: BLE001 - see the class docstring
                if now - self._warned_at >= 60:
                    self._warned_at = now
                    log.warning("could not read the machines being provisioned (timeline "
                                "events wait for the next read): %s", exc)
            finally:
                self._lock.release()
        return self._addresses.get(address)
