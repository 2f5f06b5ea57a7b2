"""Run the Flask app under gunicorn (threaded workers, so a slow kernel download does not
hold a whole worker, and file bodies go out with sendfile)."""

from __future__ import annotations

from gunicorn.app.base import BaseApplication

from appliance.config import Config


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
        }
        if "control_socket_disable" in self.cfg.settings:  # gunicorn >= 24
            settings["control_socket_disable"] = True
        for key, value in settings.items():
            self.cfg.set(key, value)

    def load(self):  # type: ignore[no-untyped-def]
        from appliance.web import create_app

        return create_app(self.appliance_config)


def run(config: Config) -> int:
    _Gunicorn(config).run()
    return 0
