"""A user and an API token for tests that call the JSON API."""

from __future__ import annotations

from typing import Any

from appliance.auth import tokens, users
from appliance.db import Database
from appliance.models import User

PASSWORD = "correct horse battery"


def api_token(db: Database, name: str = "tester") -> str:
    """A fresh token of user ``name`` (added the first time)."""
    with db.session() as session:
        user = session.query(User).filter_by(name=name).one_or_none() or \
            users.add_user(session, name, PASSWORD, actor="test")
        _, token = tokens.create_token(session, user, actor="test", label="tests")
    return token


def authorize(client: Any, db: Database, name: str = "tester") -> str:
    """Make every request of a Flask test client carry a token of ``name``."""
    token = api_token(db, name)
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    return token
