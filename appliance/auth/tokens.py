"""API tokens: bearer credentials for scripts and the remote CLI, one user each.

A token is ``apl_`` + 43 URL-safe characters (256 bits). The database keeps its SHA-256
(a fast hash is enough for a random 256-bit secret; there is nothing to guess) and its
first characters for lists; the token itself is printed once, at creation.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from appliance.auth.users import AuthError
from appliance.lifecycle.events import record_event
from appliance.models import ApiToken, User, utcnow

TOKEN_PREFIX = "apl_"
#: ``last_used_at`` is written at most this often per token (not on every request).
LAST_USED_RESOLUTION = dt.timedelta(seconds=60)
MAX_LABEL = 64


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(session: Session, user: User, *, actor: str, label: str = "",
                 expires_days: int | None = None) -> tuple[ApiToken, str]:
    """A new token for ``user``: (the row, the token to show once)."""
    if len(label) > MAX_LABEL:
        raise AuthError(f"label: at most {MAX_LABEL} characters")
    if expires_days is not None and not 1 <= expires_days <= 3650:
        raise AuthError("expires_days: 1 to 3650")
    if user.disabled_at is not None:
        raise AuthError(f"user {user.name} is disabled")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(user=user, label=label, token_sha256=_digest(token), prefix=token[:12],
                   expires_at=(utcnow() + dt.timedelta(days=expires_days)
                               if expires_days else None))
    session.add(row)
    session.flush()
    record_event(session, None, actor, "token-created",
                 f"API token {row.id} ({row.prefix}…) for {user.name} created by {actor}",
                 {"user": user.name, "token_id": row.id, "label": label})
    return row, token


def revoke_token(session: Session, token_id: int, *, actor: str,
                 only_user: User | None = None) -> ApiToken:
    """Revoke a token (``only_user``: refuse tokens of other users)."""
    row = session.get(ApiToken, token_id)
    if row is None or (only_user is not None and row.user_id != only_user.id):
        raise AuthError(f"no API token {token_id}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        record_event(session, None, actor, "token-revoked",
                     f"API token {row.id} ({row.prefix}…) of {row.user.name} revoked by "
                     f"{actor}", {"user": row.user.name, "token_id": row.id})
    return row


def user_for_token(session: Session, token: str) -> tuple[User, ApiToken] | None:
    """The enabled user a live token belongs to, or None (unknown, revoked, expired)."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 128:
        return None
    row = session.scalar(select(ApiToken).where(ApiToken.token_sha256 == _digest(token)))
    now = utcnow()
    if row is None or row.revoked_at is not None or \
            (row.expires_at is not None and row.expires_at <= now) or \
            row.user.disabled_at is not None:
        return None
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_RESOLUTION:
        row.last_used_at = now
    return row.user, row


def list_tokens(session: Session, user: User | None = None) -> list[ApiToken]:
    query = select(ApiToken).order_by(ApiToken.id)
    if user is not None:
        query = query.where(ApiToken.user_id == user.id)
    return list(session.scalars(query))


def token_state(row: ApiToken) -> str:
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at is not None and row.expires_at <= utcnow():
        return "expired"
    return "active"
