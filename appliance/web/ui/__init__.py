"""The web UI: server-rendered pages (Flask + Jinja2, no build step), a little
JavaScript for live progress, and every write through the same functions as the CLI
and the API (:mod:`appliance.listing`, :mod:`appliance.lifecycle.operations`).

Every page needs a login (``appliance user add`` makes the first user); every form
carries the session's CSRF token and is refused without it.
"""

from appliance.web.ui import inventory_pages, power_forms  # noqa: F401 - their routes
from appliance.web.ui.pages import ui

__all__ = ["ui"]
