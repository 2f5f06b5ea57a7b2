"""Operator-facing power functions: BMC settings, queued requests, waiting for them.

The CLI, the API and the UI call these; none of them talks to a BMC itself. A request
is a row the ``power`` part of the daemon executes (:mod:`appliance.power.worker`), so
a slow or dead BMC never holds a web request or a database transaction.
"""

from __future__ import annotations

import ipaddress
import re
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from appliance import secretbox
from appliance.config import Config
from appliance.lifecycle import record_event
from appliance.models import Counter, Machine, PowerRequest, utcnow
from appliance.power.calls import DRIVERS, check_operation
from appliance.power.driver import BOOT_MODES, BmcAccess

DEFAULT_PORTS = {"ipmi": 623, "redfish": 443}
#: IPMI 2.0 limits: user names of 16 bytes, passwords of 20 bytes.
IPMI_MAX_USERNAME = 16
IPMI_MAX_PASSWORD = 20
FINISHED = ("succeeded", "failed", "cancelled")
#: A power part whose heartbeat is older than this is taken as not running.
HEARTBEAT_STALE = 10.0
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


class PowerError(ValueError):
    """A power request or BMC setting is refused; the message names what is wrong."""


@dataclass(frozen=True)
class BmcSettings:
    driver: str
    address: str
    username: str
    password: str = field(repr=False)
    port: int | None = None
    verify_tls: bool = True
    system_id: str = ""


def _check_address(driver: str, address: str) -> str:
    address = address.strip()
    if not address:
        raise PowerError("address: empty; give the BMC's IP address or host name")
    host = address
    if driver == "redfish" and "://" in address:
        url = urlsplit(address)
        if url.scheme not in ("http", "https"):
            raise PowerError(f"address: scheme {url.scheme!r} is not http or https")
        if "@" in url.netloc:
            raise PowerError("address: no user or password in the URL; give them with "
                             "username and password (the password is stored encrypted)")
        if url.path not in ("", "/") or url.query or url.fragment:
            raise PowerError("address: only scheme, host and port (the Redfish service "
                             "root is found at /redfish/v1)")
        try:
            _ = url.port
        except ValueError:
            raise PowerError(f"address: {address!r} has an invalid port") from None
        host = url.hostname or ""
    try:
        ipaddress.ip_address(host)
        return address
    except ValueError:
        pass
    if not _HOSTNAME.match(host):
        raise PowerError(f"address: {address!r} is neither an IP address nor a host name")
    return address


def _default_port(driver: str, address: str) -> int:
    """623 for IPMI; for Redfish the URL's own port, else 80 for http://, 443 otherwise."""
    if driver == "redfish" and "://" in address:
        url = urlsplit(address)
        return url.port or (80 if url.scheme == "http" else 443)
    return DEFAULT_PORTS[driver]


def check_settings(settings: BmcSettings) -> BmcSettings:
    """Refuse incomplete or impossible BMC settings, naming the field."""
    if settings.driver not in DRIVERS:
        raise PowerError(f"driver: {settings.driver!r} is not one of {', '.join(DRIVERS)}")
    address = _check_address(settings.driver, settings.address)
    port = settings.port if settings.port is not None else _default_port(settings.driver,
                                                                         address)
    if not 0 < port < 65536:
        raise PowerError(f"port: {port} is not a valid port")
    if not settings.username:
        raise PowerError("username: empty; the BMC's user name is required")
    if not settings.password:
        raise PowerError("password: empty; the BMC's password is required")
    if settings.driver == "ipmi":
        if len(settings.username.encode()) > IPMI_MAX_USERNAME:
            raise PowerError(f"username: IPMI allows at most {IPMI_MAX_USERNAME} bytes")
        if len(settings.password.encode()) > IPMI_MAX_PASSWORD:
            raise PowerError(f"password: IPMI 2.0 allows at most {IPMI_MAX_PASSWORD} bytes")
    if any(c in settings.username for c in "\r\n\0"):
        raise PowerError("username: control characters are not allowed")
    return BmcSettings(settings.driver, address, settings.username, settings.password, port,
                       settings.verify_tls, settings.system_id.strip())


def set_bmc(config: Config, session: Session, machine: Machine, settings: BmcSettings,
            actor: str) -> None:
    """Store a machine's BMC settings; the password is encrypted, never logged."""
    settings = check_settings(settings)
    machine.bmc_driver = settings.driver
    machine.bmc_address = settings.address
    machine.bmc_port = settings.port
    machine.bmc_username = settings.username
    try:
        machine.bmc_password = secretbox.encrypt(config.state_dir, settings.password)
    except secretbox.SecretError as exc:
        raise PowerError(f"password: cannot be stored: {exc}") from None
    machine.bmc_verify_tls = settings.verify_tls
    machine.bmc_system_id = settings.system_id or None
    machine.power_state = None
    machine.power_error = None
    record_event(session, machine, actor, "bmc-set",
                 f"BMC set: {settings.driver} {settings.username}@{settings.address}:"
                 f"{settings.port}", details=bmc_summary(machine))


def clear_bmc(session: Session, machine: Machine, actor: str) -> None:
    for column in ("bmc_driver", "bmc_address", "bmc_port", "bmc_username", "bmc_password",
                   "bmc_system_id", "power_state", "power_checked_at", "power_error"):
        setattr(machine, column, None)
    machine.bmc_verify_tls = True
    record_event(session, machine, actor, "bmc-cleared", "BMC settings removed")


def bmc_summary(machine: Machine) -> dict[str, Any] | None:
    """The machine's BMC settings for display: no password, only whether one is set."""
    if not machine.bmc_driver:
        return None
    return {
        "driver": machine.bmc_driver, "address": machine.bmc_address,
        "port": machine.bmc_port, "username": machine.bmc_username,
        "password_set": bool(machine.bmc_password), "verify_tls": machine.bmc_verify_tls,
        "system_id": machine.bmc_system_id,
    }


def bmc_access(config: Config, machine: Machine) -> BmcAccess:
    """How to reach the machine's BMC, password decrypted (for the worker only)."""
    if not machine.bmc_driver or not machine.bmc_address or not machine.bmc_password:
        raise PowerError(f"machine {machine_label(machine)} has no BMC settings: set them with "
                         "`appliance machine bmc`")
    try:
        password = secretbox.decrypt(config.state_dir, machine.bmc_password)
    except secretbox.SecretError as exc:
        raise PowerError(f"machine {machine_label(machine)}: BMC password: {exc}") from None
    return BmcAccess(
        driver=machine.bmc_driver, address=machine.bmc_address,
        port=machine.bmc_port or DEFAULT_PORTS.get(machine.bmc_driver, 0),
        username=machine.bmc_username or "", password=password,
        verify_tls=machine.bmc_verify_tls, system_id=machine.bmc_system_id or "")


def machine_label(machine: Machine) -> str:
    return machine.hostname or machine.mac


def persistence(persistent: bool) -> str:
    """How a boot override applies, in words for events and CLI output."""
    return "persistent" if persistent else "next boot only"


def default_boot_mode(machine: Machine) -> str:
    """UEFI when the machine last network-booted as UEFI (DHCP option 93), else BIOS."""
    return "uefi" if (machine.arch or "").startswith("uefi") else "bios"


def request(session: Session, machine: Machine, operation: str, args: dict[str, Any],
            actor: str) -> PowerRequest:
    """Queue one BMC operation for the machine; the ``power`` part runs it."""
    if not machine.bmc_driver:
        raise PowerError(f"machine {machine_label(machine)} has no BMC: set one with "
                         "`appliance machine bmc` (or power it by hand)")
    args = dict(args)
    if operation == "boot" and args.get("mode") is None:
        args["mode"] = default_boot_mode(machine)
    if operation == "boot" and args.get("mode") not in BOOT_MODES:
        raise PowerError(f"mode: {args.get('mode')!r} is not one of {', '.join(BOOT_MODES)}")
    try:
        args = check_operation(operation, args)
    except ValueError as exc:
        raise PowerError(str(exc)) from None
    req = PowerRequest(machine=machine, operation=operation, args=args, actor=actor,
                       state="queued", attempts=0, created_at=utcnow())
    session.add(req)
    session.flush()
    return req


def cancel_if_queued(session: Session, request_id: int, reason: str) -> bool:
    """Cancel a request nobody has started; False when a worker already took it."""
    done = session.execute(
        update(PowerRequest).where(PowerRequest.id == request_id,
                                   PowerRequest.state == "queued")
        .values(state="cancelled", error=reason, finished_at=utcnow()))
    return bool(done.rowcount)


def wait(db: Any, request_id: int, timeout: float, claim_timeout: float = 10.0,
         interval: float = 0.2) -> PowerRequest:
    """Wait for a request to finish. One that no worker takes within ``claim_timeout`` is
    cancelled (so it cannot fire unexpectedly later) and reported."""
    started = time.monotonic()
    while True:
        with db.session() as session:
            req = session.get(PowerRequest, request_id)
            if req is None:
                raise PowerError(f"power request {request_id} does not exist")
            if req.state in FINISHED:
                session.expunge(req)
                return req
            waited = time.monotonic() - started
            if req.state == "queued" and waited >= claim_timeout \
                    and not power_part_alive(session):
                if cancel_if_queued(session, request_id, "no power worker took the request"):
                    session.commit()
                    raise PowerError(
                        f"no power part is running (no heartbeat for {HEARTBEAT_STALE:g} s), "
                        f"so request {request_id} was cancelled: is `appliance serve` "
                        "running with the power part enabled?")
            if waited >= timeout:
                raise PowerError(f"power request {request_id} is still {req.state} after "
                                 f"{timeout:g} s; see `appliance events`")
        time.sleep(interval)


def power_part_alive(session: Session) -> bool:
    """Whether a ``power`` part has written its heartbeat recently."""
    beat = session.scalar(select(Counter.value).where(Counter.part == "power",
                                                      Counter.name == "heartbeat"))
    return beat is not None and time.time() - beat < HEARTBEAT_STALE
