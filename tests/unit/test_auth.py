"""Users, API tokens, login sessions and CSRF (appliance/auth, appliance/web/auth.py)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import select

from appliance.auth import passwords, tokens, users
from appliance.auth.users import AuthError
from appliance.config import Config
from appliance.db import Database
from appliance.models import ApiToken, Event, User, utcnow
from tests.apiauth import PASSWORD


@pytest.fixture
def env(tmp_path: Path) -> tuple[Config, Database]:
    config = Config(state_dir=str(tmp_path))
    db = Database(config.effective_database_url)
    db.migrate()
    return config, db


def _client(env: tuple[Config, Database]):  # type: ignore[no-untyped-def]
    from appliance.web import create_app

    config, db = env
    return create_app(config, db).test_client()


def test_password_policy_and_hashing() -> None:
    for bad, why in (("short", "at least 10"), (" padded password ", "white space"),
                     ("x" * 1025, "at most")):
        with pytest.raises(passwords.PasswordError, match=why):
            passwords.hash_password(bad)
    stored = passwords.hash_password(PASSWORD)
    assert stored.startswith("$argon2id$") and PASSWORD not in stored
    assert passwords.verify_password(stored, PASSWORD)
    assert not passwords.verify_password(stored, PASSWORD + "!")
    assert not passwords.verify_password(None, PASSWORD)  # no such user
    assert not passwords.verify_password("garbage", PASSWORD)


def test_users_are_checked_and_every_change_is_an_event(env) -> None:  # type: ignore[no-untyped-def]
    _, db = env
    with db.session() as session:
        for name in ("", "Admin", "1abc", "a b", "x" * 65):
            with pytest.raises(AuthError, match="user name"):
                users.add_user(session, name, PASSWORD, actor="t")
        with pytest.raises(AuthError, match="at least 10"):
            users.add_user(session, "alice", "short", actor="t")
        users.add_user(session, "alice", PASSWORD, actor="cli:root")
    with db.session() as session:
        with pytest.raises(AuthError, match="exists"):
            users.add_user(session, "alice", PASSWORD, actor="t")
    with db.session() as session:
        assert users.authenticate(session, "alice", PASSWORD) is not None
        assert users.authenticate(session, "alice", "wrong password!") is None
        assert users.authenticate(session, "nobody", PASSWORD) is None
        alice = users.get_user(session, "alice")
        users.set_disabled(session, alice, True, actor="cli:root")
        assert users.authenticate(session, "alice", PASSWORD) is None
        users.set_disabled(session, alice, False, actor="cli:root")
        users.set_password(session, alice, "a new long password", actor="cli:root")
        assert users.authenticate(session, "alice", PASSWORD) is None
        assert users.authenticate(session, "alice", "a new long password") is not None
        kinds = [e.kind for e in session.scalars(select(Event).order_by(Event.id))]
    assert kinds == ["user-added", "user-disabled", "user-enabled", "user-password-changed"]


def test_tokens_are_stored_as_hashes_and_die_when_revoked_expired_or_disabled(env) -> None:  # type: ignore[no-untyped-def]
    _, db = env
    with db.session() as session:
        alice = users.add_user(session, "alice", PASSWORD, actor="t")
        row, token = tokens.create_token(session, alice, actor="t", label="ci")
        _, other = tokens.create_token(session, alice, actor="t", expires_days=1)
        token_id = row.id
    assert token.startswith("apl_") and len(token) > 40
    with db.session() as session:
        stored = session.get(ApiToken, token_id)
        assert token not in (stored.token_sha256, stored.prefix, stored.label)
        found = tokens.user_for_token(session, token)
        assert found is not None and found[0].name == "alice"
        assert tokens.user_for_token(session, token[:-1] + "x") is None
        assert tokens.user_for_token(session, "Bearer " + token) is None
        tokens.revoke_token(session, token_id, actor="t")
    with db.session() as session:
        assert tokens.user_for_token(session, token) is None
        assert tokens.user_for_token(session, other) is not None
        for row in tokens.list_tokens(session):
            row.expires_at = utcnow() - dt.timedelta(seconds=1)
    with db.session() as session:
        assert tokens.user_for_token(session, other) is None
        assert [tokens.token_state(r) for r in tokens.list_tokens(session)] == \
            ["revoked", "expired"]
        _, third = tokens.create_token(session, users.get_user(session, "alice"), actor="t")
        users.set_disabled(session, users.get_user(session, "alice"), True, actor="t")
    with db.session() as session:
        assert tokens.user_for_token(session, third) is None
        with pytest.raises(AuthError, match="disabled"):
            tokens.create_token(session, users.get_user(session, "alice"), actor="t")
        with pytest.raises(AuthError, match="no API token 999"):
            tokens.revoke_token(session, 999, actor="t")


def test_the_api_refuses_missing_malformed_and_unknown_credentials(env) -> None:  # type: ignore[no-untyped-def]
    client = _client(env)
    r = client.get("/api/v1/power-requests/1")
    assert r.status_code == 401 and "Bearer" in r.headers["WWW-Authenticate"]
    assert "log in" in r.json["error"]
    for header, message in (("Basic YWxpY2U6eA==", "expected 'Bearer"),
                            ("Bearer", "expected 'Bearer"),
                            ("Bearer apl_notatoken", "unknown, revoked or expired")):
        r = client.get("/api/v1/power-requests/1", headers={"Authorization": header})
        assert r.status_code == 401 and message in r.json["error"], (header, r.json)


def test_a_revoked_token_cannot_act_and_the_actor_is_the_user(env) -> None:  # type: ignore[no-untyped-def]
    config, db = env
    with db.session() as session:
        alice = users.add_user(session, "alice", PASSWORD, actor="t")
        row, token = tokens.create_token(session, alice, actor="t")
        token_id = row.id
    client = _client(env)
    auth = {"Authorization": f"Bearer {token}"}
    r = client.get("/api/v1/power-requests/1", headers=auth)
    assert r.status_code == 404  # in, and there is no such request
    with db.session() as session:
        assert session.get(ApiToken, token_id).last_used_at is not None
        tokens.revoke_token(session, token_id, actor="t")
    r = client.get("/api/v1/power-requests/1", headers=auth)
    assert r.status_code == 401


def _login(client, db: Database, name: str = "alice") -> str:  # type: ignore[no-untyped-def]
    """A login session as the UI makes it; returns its CSRF token."""
    with db.session() as session:
        user = session.scalar(select(User).where(User.name == name)) or \
            users.add_user(session, name, PASSWORD, actor="t")
        uid, epoch = user.id, user.session_epoch
    with client.session_transaction() as sess:
        sess.update(uid=uid, epoch=epoch, csrf="the-csrf-token")
    return "the-csrf-token"


def test_session_writes_need_the_csrf_token_and_reads_do_not(env) -> None:  # type: ignore[no-untyped-def]
    _, db = env
    client = _client(env)
    csrf = _login(client, db)
    assert client.get("/api/v1/power-requests/1").status_code == 404
    r = client.post("/api/v1/machines/nope/accept")
    assert r.status_code == 403 and "CSRF" in r.json["error"]
    r = client.post("/api/v1/machines/nope/accept", headers={"X-CSRF-Token": "wrong"})
    assert r.status_code == 403
    r = client.post("/api/v1/machines/nope/accept", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 404  # past auth and CSRF: the machine does not exist


def test_a_password_change_or_disable_ends_login_sessions(env) -> None:  # type: ignore[no-untyped-def]
    _, db = env
    client = _client(env)
    _login(client, db)
    assert client.get("/api/v1/power-requests/1").status_code == 404
    with db.session() as session:
        users.set_password(session, users.get_user(session, "alice"), "another password",
                           actor="t")
    assert client.get("/api/v1/power-requests/1").status_code == 401
    _login(client, db)
    assert client.get("/api/v1/power-requests/1").status_code == 404
    with db.session() as session:
        users.set_disabled(session, users.get_user(session, "alice"), True, actor="t")
    assert client.get("/api/v1/power-requests/1").status_code == 401


def test_machine_urls_need_no_user(env) -> None:  # type: ignore[no-untyped-def]
    client = _client(env)
    assert client.get("/healthz").status_code == 200
    assert client.get("/install/unknowntoken/preseed.cfg").status_code == 404
    assert client.get("/boot/52:54:00:00:00:01.ipxe").status_code == 200
