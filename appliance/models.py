"""The database schema. Every change here needs an Alembic migration in migrations/versions."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Subnet(Base):
    """An IPv4 subnet the DHCP server hands addresses out on (directly or via a relay)."""

    __tablename__ = "subnets"

    id: Mapped[int] = mapped_column(primary_key=True)
    network: Mapped[str] = mapped_column(String(43), unique=True)  # "10.0.0.0/24"
    pool_start: Mapped[str | None] = mapped_column(String(15))
    pool_end: Mapped[str | None] = mapped_column(String(15))
    router: Mapped[str | None] = mapped_column(String(15))
    dns_servers: Mapped[str] = mapped_column(String(255), default="")  # comma separated
    domain_name: Mapped[str] = mapped_column(String(255), default="")
    lease_seconds: Mapped[int] = mapped_column(Integer, default=3600)
    #: Address of the appliance as machines on this subnet see it (TFTP next-server and
    #: HTTP URLs). Empty: the address the request arrived on, or http.public_address.
    next_server: Mapped[str | None] = mapped_column(String(15))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    reservations: Mapped[list[Reservation]] = relationship(back_populates="subnet")


class Reservation(Base):
    """A fixed address for one MAC."""

    __tablename__ = "reservations"

    id: Mapped[int] = mapped_column(primary_key=True)
    mac: Mapped[str] = mapped_column(String(17), unique=True)
    ip: Mapped[str] = mapped_column(String(15), unique=True)
    hostname: Mapped[str | None] = mapped_column(String(255))
    subnet_id: Mapped[int] = mapped_column(ForeignKey("subnets.id", ondelete="CASCADE"))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    subnet: Mapped[Subnet] = relationship(back_populates="reservations")


class Lease(Base):
    """One address's binding. A row per address ever handed out; state says if it is live."""

    __tablename__ = "leases"

    id: Mapped[int] = mapped_column(primary_key=True)
    ip: Mapped[str] = mapped_column(String(15), unique=True)
    mac: Mapped[str] = mapped_column(String(17), index=True)
    subnet_id: Mapped[int] = mapped_column(ForeignKey("subnets.id", ondelete="CASCADE"))
    #: offered | bound | released | declined
    state: Mapped[str] = mapped_column(String(16))
    hostname: Mapped[str | None] = mapped_column(String(255))
    client_id: Mapped[str | None] = mapped_column(String(255))
    starts_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    #: Not indexed: each index costs every lease write in the DHCP packet loop, and no
    #: query needs this one (schema 0004).
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class Machine(Base):
    """A machine known to the appliance, first seen by DHCP or HTTP boot."""

    __tablename__ = "machines"

    id: Mapped[int] = mapped_column(primary_key=True)
    mac: Mapped[str] = mapped_column(String(17), unique=True)
    hostname: Mapped[str | None] = mapped_column(String(255))
    #: discovered | available | provisioning | installing | ready | failed
    state: Mapped[str] = mapped_column(String(32), default="discovered")
    #: Boot environment the next boot gets (``discovery`` for unknown machines).
    bootenv: Mapped[str] = mapped_column(String(64), default="discovery")
    #: Client system architecture (DHCP option 93), e.g. "bios", "uefi-x64".
    arch: Mapped[str | None] = mapped_column(String(32))
    first_seen_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_seen_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    #: Where it was seen: interface name, or "relay <giaddr>", or "http <address>".
    seen_on: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    #: Names of the profiles whose params apply, in order (later wins); ``global`` always
    #: applies first and is not listed.
    profiles: Mapped[list[str]] = mapped_column(JSON, default=list)
    #: The machine's own params: the top layer, over its profiles and ``global``.
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: One-time credential of the current install: in the answer-file, log and
    #: install-finished URLs. A new one per install; cleared when the install is over.
    install_token: Mapped[str | None] = mapped_column(String(64), unique=True)
    #: Per-machine token of the installed OS's cloud-init NoCloud seed URL and of its
    #: phone-home URL; a new one per deployment (``appliance/lifecycle``).
    seed_token: Mapped[str | None] = mapped_column(String(64), unique=True)

    #: Lifecycle (``appliance/lifecycle/states.py``). Every transition bumps
    #: ``state_serial`` with a conditional UPDATE, so of two concurrent ones only one wins.
    state_serial: Mapped[int] = mapped_column(Integer, default=0)
    #: Step within the state: provisioning ``power``/``boot``; installing ``installer``/
    #: ``first-boot``/``contract``; else none.
    phase: Mapped[str | None] = mapped_column(String(32))
    phase_started_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    #: When the phase times out and the machine goes to ``failed`` (none: no limit).
    phase_deadline: Mapped[dt.datetime | None] = mapped_column(DateTime, index=True)
    #: Why the machine is in its state (the reason of the last transition).
    state_reason: Mapped[str | None] = mapped_column(Text)
    #: The current deployment: cloud-init's instance-id, new on every reimage.
    instance_id: Mapped[str | None] = mapped_column(String(32), unique=True)
    #: What the current deployment was asked for: bootenv, actor, reason, when.
    deployment: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: SSH host public keys the installed OS phoned home (``{"ssh-ed25519": "..."}``).
    ssh_host_keys: Mapped[dict[str, str] | None] = mapped_column(JSON)
    #: Outcome of the appliance's own post-provision contract check.
    contract: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    #: BMC settings (``appliance/power``); no driver means no BMC: power by hand.
    bmc_driver: Mapped[str | None] = mapped_column(String(16))
    bmc_address: Mapped[str | None] = mapped_column(String(255))
    bmc_port: Mapped[int | None] = mapped_column(Integer)
    bmc_username: Mapped[str | None] = mapped_column(String(64))
    #: Encrypted with the key in the state directory (``appliance/secretbox.py``).
    bmc_password: Mapped[str | None] = mapped_column(Text)
    bmc_verify_tls: Mapped[bool] = mapped_column(Boolean, default=True)
    bmc_system_id: Mapped[str | None] = mapped_column(String(255))
    #: Last power state the BMC reported (``on``/``off``), when, and the last error.
    power_state: Mapped[str | None] = mapped_column(String(16))
    power_checked_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    power_error: Mapped[str | None] = mapped_column(Text)

    events: Mapped[list[Event]] = relationship(back_populates="machine")


class Event(Base):
    """Something that happened: who, when, what, why."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(primary_key=True)
    machine_id: Mapped[int | None] = mapped_column(
        ForeignKey("machines.id", ondelete="CASCADE"), index=True
    )
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text, default="")
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    machine: Mapped[Machine | None] = relationship(back_populates="events")


class PowerRequest(Base):
    """One BMC operation asked for by an operator (CLI, API, UI) or the lifecycle.

    The ``power`` part of the daemon takes queued requests in order, one at a time per
    machine, runs them on its worker pool and writes the outcome here and as an event.
    """

    __tablename__ = "power_requests"

    id: Mapped[int] = mapped_column(primary_key=True)
    machine_id: Mapped[int] = mapped_column(
        ForeignKey("machines.id", ondelete="CASCADE"), index=True
    )
    #: status | power | boot | get-boot | identify | validate (``power/calls.py``)
    operation: Mapped[str] = mapped_column(String(16))
    #: Why the request exists when not asked by hand: ``reimage`` (the lifecycle waits
    #: for it, and a failure fails the deployment).
    purpose: Mapped[str | None] = mapped_column(String(32))
    args: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    actor: Mapped[str] = mapped_column(String(64))
    #: queued | running | succeeded | failed | cancelled
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    error_kind: Mapped[str | None] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)

    machine: Mapped[Machine] = relationship()


class Counter(Base):
    """Running totals a server part publishes (packets answered, dropped, ...)."""

    __tablename__ = "counters"
    __table_args__ = (UniqueConstraint("part", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    part: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class Profile(Base):
    """A named set of params machines reference. ``global`` applies to every machine."""

    __tablename__ = "profiles"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class Image(Base):
    """An artifact imported into the image store (``<state_dir>/images``), verified."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    #: URL or local path it was imported from.
    source: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    #: Paths relative to the images directory: the artifact itself and what was
    #: extracted from it.
    files: Mapped[list[str]] = mapped_column(JSON, default=list)
    imported_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class InstallLog(Base):
    """A line an installer sent (remote syslog or the log upload endpoint)."""

    __tablename__ = "install_logs"

    id: Mapped[int] = mapped_column(primary_key=True)
    machine_id: Mapped[int | None] = mapped_column(
        ForeignKey("machines.id", ondelete="CASCADE"), index=True
    )
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    #: ``syslog`` or ``upload``.
    source: Mapped[str] = mapped_column(String(16))
    #: Address the line came from.
    client: Mapped[str] = mapped_column(String(45), default="")
    #: Syslog severity 0-7 (7 debug) when known.
    severity: Mapped[int | None] = mapped_column(Integer)
    program: Mapped[str] = mapped_column(String(64), default="")
    message: Mapped[str] = mapped_column(Text, default="")


class User(Base):
    """A person who operates the appliance through the web UI, the API or the remote CLI
    (``appliance/auth``). The local CLI (root on the appliance) needs no user."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    #: argon2id (``appliance/auth/passwords.py``).
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_login_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    #: A disabled user can neither log in nor use their API tokens.
    disabled_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    #: Bumped by a password change or a disable: every login session made before ends.
    session_epoch: Mapped[int] = mapped_column(Integer, default=0)

    tokens: Mapped[list[ApiToken]] = relationship(back_populates="user")


class ApiToken(Base):
    """A bearer token for scripts and the remote CLI. Only its SHA-256 is stored: the
    token itself is shown once, when it is created."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    label: Mapped[str] = mapped_column(String(64), default="")
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    #: The token's first characters, to tell tokens apart in lists and logs.
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime)

    user: Mapped[User] = relationship(back_populates="tokens")
