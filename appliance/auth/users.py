"""Appliance users: add, change password, disable, enable, authenticate. The CLI, the API
and the web UI call these; every change is an event with the actor."""

from __future__ import annotations

import re

from sqlalchemy import select
from sqlalchemy.orm import Session

from appliance.auth.passwords import (
    PasswordError,
    hash_password,
    needs_rehash,
    verify_password,
)
from appliance.lifecycle.events import record_event
from appliance.models import User, utcnow

NAME_RE = re.compile(r"[a-z_][a-z0-9_.-]{0,63}")


class AuthError(ValueError):
    """A user or token operation refused (the message names what is wrong)."""


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name or ""):
        raise AuthError(f"user name {name[:80]!r}: 1-64 characters, lower-case letters, "
                        "digits, '_', '.', '-', starting with a letter or '_'")
    return name


def get_user(session: Session, name: str) -> User:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise AuthError(f"no user {name[:80]!r} (appliance user list)")
    return user


def add_user(session: Session, name: str, password: str, *, actor: str) -> User:
    check_name(name)
    if session.scalar(select(User.id).where(User.name == name)) is not None:
        raise AuthError(f"user {name!r} exists; change its password with "
                        f"`appliance user passwd {name}`")
    user = User(name=name, password_hash=_hash(password))
    session.add(user)
    session.flush()
    record_event(session, None, actor, "user-added", f"user {name} added by {actor}",
                 {"user": name})
    return user


def set_password(session: Session, user: User, password: str, *, actor: str) -> None:
    """New password; every login session of the user ends (their API tokens stay)."""
    user.password_hash = _hash(password)
    user.session_epoch = (user.session_epoch or 0) + 1
    record_event(session, None, actor, "user-password-changed",
                 f"password of {user.name} changed by {actor}", {"user": user.name})


def set_disabled(session: Session, user: User, disabled: bool, *, actor: str) -> None:
    """Disable (no login, no token works, sessions end) or enable a user."""
    if disabled and user.disabled_at is None:
        user.disabled_at = utcnow()
        user.session_epoch = (user.session_epoch or 0) + 1
    elif not disabled:
        user.disabled_at = None
    kind = "user-disabled" if disabled else "user-enabled"
    record_event(session, None, actor, kind, f"{user.name} {kind.split('-')[1]} by {actor}",
                 {"user": user.name})


def authenticate(session: Session, name: str, password: str) -> User | None:
    """The enabled user with this name and password, or None (same time either way)."""
    user = session.scalar(select(User).where(User.name == name[:64]))
    if not verify_password(user.password_hash if user else None, password[:1024]):
        return None
    assert user is not None
    if user.disabled_at is not None:
        return None
    if needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
    user.last_login_at = utcnow()
    return user


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.name)))


def _hash(password: str) -> str:
    try:
        return hash_password(password)
    except PasswordError as exc:
        raise AuthError(str(exc)) from None
