"""``GET /metrics``: the appliance's counters in the Prometheus text format.

Families and their meaning: ``metrics_render.py``; what is read: ``metrics_data.py``.
Registering this blueprint also counts every HTTP response of the app
(``request_counts.py``), which is what ``appliance_http_requests_total`` reports.

Only clients in ``http.metrics_networks`` (default: this box) may read it; the
provisioning network must not. :func:`refusal` is the one place that decides.
"""

from __future__ import annotations

from flask import Blueprint, Response, request

from appliance.web import state
from appliance.web.clientnets import client_in
from appliance.web.exposition import CONTENT_TYPE
from appliance.web.metrics_data import collect
from appliance.web.metrics_render import render
from appliance.web.request_counts import install

metrics = Blueprint("metrics", __name__)
metrics.record_once(lambda setup: install(setup.app))


def refusal() -> str | None:
    """Why this request may not read the metrics; None when it may."""
    allowed = state().config.http.metrics_networks
    if client_in(request.remote_addr, allowed):
        return None
    return (f"/metrics answers only {allowed or 'no one'} (setting http.metrics_networks); "
            f"{request.remote_addr or 'this client'} is not in it\n")


@metrics.get("/metrics")
def scrape() -> Response:
    why = refusal()
    if why is not None:
        return Response(why, 403, content_type="text/plain; charset=utf-8")
    return Response(render(collect(state().db)), content_type=CONTENT_TYPE)
