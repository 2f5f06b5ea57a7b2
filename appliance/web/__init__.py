"""The HTTP part: a Flask application served by gunicorn.

``create_app()`` is the application factory gunicorn calls in each worker, so every
worker opens its own database connections after the fork.
"""

from __future__ import annotations

from dataclasses import dataclass

from flask import Flask, current_app

from appliance.bootenvs import Bootenv, load_bootenvs
from appliance.config import Config, load_config
from appliance.db import Database
from appliance.paths import resolve_dir
from appliance.render import Renderer


@dataclass
class WebState:
    config: Config
    db: Database
    renderer: Renderer
    bootenvs: dict[str, Bootenv]


def create_app(config: Config | None = None, db: Database | None = None) -> Flask:
    config = config or load_config()
    db = db or Database(config.effective_database_url)
    bootenvs, _errors = load_bootenvs(resolve_dir(config.boot.bootenvs_dir, "bootenvs"))
    renderer = Renderer(resolve_dir(config.boot.templates_dir, "templates"))
    app = Flask(__name__)
    app.extensions["appliance"] = WebState(config, db, renderer, bootenvs)

    from appliance.web.boot import boot

    app.register_blueprint(boot)
    return app


def state() -> WebState:
    return current_app.extensions["appliance"]
