"""Who may see a page: a logged-in user; a form post also needs its CSRF token."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any
from urllib.parse import urlsplit

from flask import Response, redirect, render_template, request, url_for

from appliance.web import auth, state


def safe_next(target: str | None) -> str:
    """Only a path of the UI (``/ui/...``) may be the place to go after login."""
    if target and target.startswith("/ui/") and not urlsplit(target).netloc \
            and "\\" not in target:
        return target
    return url_for("ui.machines")


def login_required(view: Callable[..., Any]) -> Callable[..., Any]:
    """No login: to the login page (and back afterwards). A POST without the session's
    CSRF token: 403."""

    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with state().db.session() as session:
            try:
                auth.authenticate(session)
            except auth.Unauthorized:
                return redirect(url_for("ui.login", next=request.full_path.rstrip("?")))
        try:
            auth.check_csrf("session")
        except auth.Forbidden as exc:
            return Response(render_template("error.html", message=str(exc)), status=403)
        return view(*args, **kwargs)

    return wrapper
