"""Who is asking, for the API and the web UI: an API token (``Authorization: Bearer``)
or a login session (Flask's signed cookie), and CSRF protection for the session's
writes.

- The session cookie is signed with a key derived from the state directory's key file,
  so sessions survive restarts and are shared by every gunicorn worker. It holds the
  user id, the user's ``session_epoch`` (a password change or a disable ends every
  session), the CSRF token and the login time. HttpOnly, SameSite=Lax; ``Secure`` when
  ``auth.secure_cookies`` is set (behind a TLS proxy).
- Writes made with a session (UI forms, the UI's own fetches) must carry the session's
  CSRF token: form field ``csrf_token`` or header ``X-CSRF-Token``. Bearer-token
  requests need none (no browser sends them on its own).
- Boot, install, metadata and phone-home URLs are not behind this: machines have their
  own per-machine tokens.
"""

from __future__ import annotations

import datetime as dt
import hmac
import secrets
from typing import Any

from flask import Flask, g, request, session

from appliance.auth.tokens import user_for_token
from appliance.models import User, utcnow
from appliance.secretbox import derived_key

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"


class Unauthorized(Exception):
    """No valid credential (401)."""


class Forbidden(Exception):
    """A credential, but this request is refused (403), e.g. a missing CSRF token."""


def init_app(app: Flask, state_dir: str, *, session_hours: float,
             secure_cookies: bool) -> None:
    app.secret_key = derived_key(state_dir, b"appliance web session v1")
    app.config.update(
        SESSION_COOKIE_NAME="appliance_session", SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax", SESSION_COOKIE_SECURE=secure_cookies,
        PERMANENT_SESSION_LIFETIME=dt.timedelta(hours=session_hours))


def log_in(user: User) -> None:
    """Start a login session for ``user`` (a new CSRF token with it)."""
    session.clear()
    session.permanent = True
    session.update(uid=user.id, epoch=user.session_epoch or 0,
                   csrf=secrets.token_urlsafe(32), at=utcnow().isoformat())


def log_out() -> None:
    session.clear()


def csrf_token() -> str:
    """The session's CSRF token (for forms and the UI's fetches)."""
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return str(session["csrf"])


def authenticate(db_session: Any) -> tuple[User, str]:
    """(user, how) for this request, ``how`` being ``token`` or ``session``; raises
    Unauthorized. Cached on ``flask.g`` for the request."""
    if "auth_user_id" in g:
        user = db_session.get(User, g.auth_user_id)
        if user is not None:
            return user, g.auth_how
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, credential = header.partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise Unauthorized("Authorization: expected 'Bearer <API token>'")
        found = user_for_token(db_session, credential.strip())
        if found is None:
            raise Unauthorized("API token unknown, revoked or expired, or its user is "
                               "disabled")
        user, how = found[0], "token"
    else:
        uid = session.get("uid")
        user = db_session.get(User, uid) if isinstance(uid, int) else None
        if user is None or user.disabled_at is not None or \
                session.get("epoch") != (user.session_epoch or 0):
            if uid is not None:
                session.clear()
            raise Unauthorized("log in, or send Authorization: Bearer <API token> "
                               "(appliance token create USER)")
        how = "session"
    g.auth_user_id, g.auth_how, g.auth_user_name = user.id, how, user.name
    return user, how


def check_csrf(how: str) -> None:
    """Session writes need the session's CSRF token (form field or header)."""
    if how != "session" or request.method in SAFE_METHODS:
        return
    sent = request.headers.get(CSRF_HEADER) or request.form.get(CSRF_FIELD, "")
    expected = session.get("csrf")
    if not expected or not sent or not hmac.compare_digest(str(sent), str(expected)):
        raise Forbidden("CSRF token missing or wrong: reload the page and submit again")


def actor() -> str:
    """Who did it, for events: ``user:NAME`` (``api:ADDRESS`` before authentication)."""
    name = g.get("auth_user_name")
    return f"user:{name}" if name else f"api:{request.remote_addr}"
