"""The HTTP part: a Flask application served by gunicorn.

``create_app()`` is the application factory gunicorn calls in each worker, so every
worker opens its own database connections after the fork.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flask import Flask, current_app

from appliance.catalog import Catalog, load_catalog
from appliance.config import Config, load_config
from appliance.db import Database

log = logging.getLogger("appliance.http")


@dataclass
class WebState:
    config: Config
    db: Database
    catalog: Catalog


def create_app(config: Config | None = None, db: Database | None = None) -> Flask:
    config = config or load_config()
    db = db or Database(config.effective_database_url)
    catalog = load_catalog(config)
    for error in catalog.errors:
        log.error("refused: %s", error)
    app = Flask(__name__)
    # No request body is needed beyond an installer's log upload.
    from appliance.web.install import MAX_LOG_BYTES

    app.config["MAX_CONTENT_LENGTH"] = MAX_LOG_BYTES
    app.extensions["appliance"] = WebState(config, db, catalog)
    from appliance.web import auth

    auth.init_app(app, config.state_dir, session_hours=config.auth.session_hours,
                  secure_cookies=config.auth.secure_cookies)

    from appliance.web import (
        api_inventory,  # noqa: F401 - adds its routes to the api blueprint
        api_manage,  # noqa: F401 - adds its write routes
    )
    from appliance.web.api import api
    from appliance.web.boot import boot
    from appliance.web.install import install
    from appliance.web.metadata import metadata
    from appliance.web.metrics import metrics
    from appliance.web.ui import ui

    app.register_blueprint(boot)
    app.register_blueprint(install)
    app.register_blueprint(api)
    app.register_blueprint(metadata)
    app.register_blueprint(ui)
    app.register_blueprint(metrics)
    return app


def state() -> WebState:
    return current_app.extensions["appliance"]
