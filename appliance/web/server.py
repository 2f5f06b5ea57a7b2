"""Run the Flask app under gunicorn (threaded workers, so a slow kernel download does not
hold a whole worker, and file bodies go out with sendfile)."""

from __future__ import annotations

import logging

from gunicorn.app.base import BaseApplication

from appliance.config import Config

log = logging.getLogger("appliance.http")


class _Gunicorn(BaseApplication):
    def __init__(self, config: Config) -> None:
        self.appliance_config = config
        super().__init__()

    def load_config(self) -> None:
        http = self.appliance_config.http
        settings = {
            "bind": [f"{http.bind}:{http.port}"],
            "workers": http.workers,
            "worker_class": "gthread",
            "threads": http.threads,
            "timeout": 120,
            "graceful_timeout": 10,
            "accesslog": "-" if http.access_log else None,
            "errorlog": "-",
            "loglevel": self.appliance_config.log_level.lower(),
            "proc_name": "appliance-http",
            "sendfile": True,
            # The app is created in each worker after the fork, never in the master.
            "preload_app": False,
            # Each worker publishes its request counters (web/request_counts.py).
            "post_worker_init": _post_worker_init,
            "worker_exit": _worker_exit,
        }
        if "control_socket_disable" in self.cfg.settings:  # gunicorn >= 24
            settings["control_socket_disable"] = True
        for key, value in settings.items():
            self.cfg.set(key, value)

    def load(self):  # type: ignore[no-untyped-def]
        from appliance.web import create_app

        return create_app(self.appliance_config)


def _post_worker_init(worker) -> None:  # type: ignore[no-untyped-def]
    from appliance.web import request_counts

    request_counts.start_in_worker(getattr(worker, "wsgi", None))


def _worker_exit(_server, worker) -> None:  # type: ignore[no-untyped-def]
    from appliance.web import request_counts

    request_counts.stop_in_worker(getattr(worker, "wsgi", None))


def _forget_old_workers(config: Config) -> None:
    """Drop the request counters of the previous run's workers (a counter reset)."""
    from appliance.db import Database
    from appliance.web import request_counts

    db = Database(config.effective_database_url)
    try:
        request_counts.forget_workers(db)
    except Exception as exc:  # noqa: BLE001 - serving matters more than old counters
        log.warning("could not delete the previous HTTP workers' counters: %s", exc)
    finally:
        db.dispose()  # nothing open is forked into the workers


def run(config: Config) -> int:
    _forget_old_workers(config)
    _Gunicorn(config).run()
    return 0
