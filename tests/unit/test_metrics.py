"""/metrics: the exposition writer, the renderer on fixed data, the HTTP request counting
hook and its publishing, access control, the BMC call counters (the real server with real
traffic is in tests/integration/test_metrics.py)."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest

from appliance.config import Config, ConfigError, load_config
from appliance.db import Database, publish_counters, read_counters
from appliance.dhcp.stats import COUNTER_NAMES as DHCP_NAMES
from appliance.models import Machine, PowerRequest
from appliance.power import stats
from appliance.power.calls import CallOutcome
from appliance.power.driver import AUTH, TIMEOUT, BmcError
from appliance.tftp.engine import COUNTER_NAMES as TFTP_NAMES
from appliance.web import create_app, request_counts
from appliance.web.exposition import Family, escape_label_value, exposition, format_value
from appliance.web.metrics_data import MetricsData, collect
from appliance.web.metrics_render import render, rule_for
from tests import promtext

# -- the exposition writer ---------------------------------------------------------------

def test_family_text_and_escaping() -> None:
    fam = Family("x_total", "counter", 'Help with \\ and\na newline and "quotes".')
    fam.add(3, {"a": 'q"uote', "b": "back\\slash", "c": "new\nline"})
    fam.add(0.5)
    assert exposition([fam, Family("empty", "gauge", "no samples")]) == (
        '# HELP x_total Help with \\\\ and\\na newline and "quotes".\n'
        "# TYPE x_total counter\n"
        'x_total{a="q\\"uote",b="back\\\\slash",c="new\\nline"} 3\n'
        "x_total 0.5\n")
    parsed = promtext.parse(exposition([fam]))["x_total"]
    assert parsed.value(a='q"uote', b="back\\slash", c="new\nline") == 3


def test_values_and_refusals() -> None:
    assert [format_value(v) for v in (7, 2.5, float("inf"), float("-inf"), 1e21, True)] == [
        "7", "2.5", "+Inf", "-Inf", "1e+21", "1"]
    assert format_value(float("nan")) == "NaN"
    assert escape_label_value('a\\"\n') == 'a\\\\\\"\\n'
    with pytest.raises(ValueError, match="bad metric family"):
        Family("bad-name", "counter", "")
    with pytest.raises(ValueError, match="bad metric family"):
        Family("ok", "countr", "")
    with pytest.raises(ValueError, match="bad label name"):
        Family("ok", "gauge", "").add(1, {"bad-label": "x"})
    twice = [Family("a", "gauge", ""), Family("a", "gauge", "")]
    for fam in twice:
        fam.add(1)
    with pytest.raises(ValueError, match="twice"):
        exposition(twice)


# -- the renderer on fixed data -----------------------------------------------------------

def _call_stats() -> dict[str, int]:
    s = stats.CallStats()
    s.observe("request", "power", CallOutcome(ok=True, attempts=1, duration=0.2))
    s.observe("request", "power", CallOutcome(ok=True, attempts=1, duration=3.0))
    s.observe("request", "power", CallOutcome(ok=False, error=BmcError(TIMEOUT, "t"),
                                              attempts=3, duration=31.5))
    s.observe("request", "boot", CallOutcome(ok=False, error=BmcError("config", "no BMC")))
    s.observe("poll", "status", CallOutcome(ok=False, error=BmcError(AUTH, "pw"),
                                            attempts=1, duration=0.05))
    return s.snapshot()


def sample_data() -> MetricsData:
    changed = dt.datetime(2024, 5, 1, 12, 0, 0)
    return MetricsData(
        counters={
            "dhcp": {**dict.fromkeys(DHCP_NAMES, 0), "received": 9, "discover": 4,
                     "request": 3, "other_type": 1, "offers": 4, "acks": 3, "naks": 1,
                     "dropped_malformed": 1, "malformed_truncated": 1, "dropped_stale": 2,
                     "some_new_name": 5},
            "tftp": {**dict.fromkeys(TFTP_NAMES, 0), "transfers_completed": 2,
                     "bytes_sent": 4096, "tsize_probes": 1, "malformed_dropped": 1},
            "http-100": {"boot_2xx": 5, "images_4xx": 1},
            "http-200": {"boot_2xx": 2, "metrics_2xx": 1, "api_1xx": 1, "odd": 7},
            "power": {"heartbeat": 1714564800, "in_flight": 2, **_call_stats()},
            "lifecycle": {"heartbeat": 1714564801, "checks": 3},
            'we"ird\\': {"x\ny": 1},
        },
        changed_at={"dhcp": changed, "http-100": changed,
                    "http-200": changed + dt.timedelta(seconds=1)},
        machines={"discovered": 2, "ready": 1, "retired": 1},
        bmc_unreachable=1,
        bmc_pending={"queued": 3},
    )


def test_render_fixed_data_exact_lines() -> None:
    text = render(sample_data())
    lines = text.splitlines()
    expected = [
        "# HELP appliance_dhcp_datagrams_received_total DHCP datagrams read, malformed ones "
        "included.",
        "# TYPE appliance_dhcp_datagrams_received_total counter",
        "appliance_dhcp_datagrams_received_total 9",
        'appliance_dhcp_packets_received_total{type="discover"} 4',
        'appliance_dhcp_packets_received_total{type="request"} 3',
        'appliance_dhcp_packets_received_total{type="other"} 1',
        'appliance_dhcp_replies_total{type="offer"} 4',
        'appliance_dhcp_replies_total{type="ack"} 3',
        'appliance_dhcp_replies_total{type="nak"} 1',
        'appliance_dhcp_dropped_total{reason="malformed"} 1',
        'appliance_dhcp_dropped_total{reason="stale"} 2',
        'appliance_dhcp_dropped_total{reason="pool_exhausted"} 0',
        'appliance_dhcp_malformed_total{reason="truncated"} 1',
        'appliance_dhcp_sightings_total{outcome="dropped"} 0',
        'appliance_tftp_transfers_total{outcome="completed"} 2',
        'appliance_tftp_transfers_total{outcome="tsize_probe"} 1',
        "appliance_tftp_bytes_sent_total 4096",
        'appliance_tftp_dropped_total{reason="malformed"} 1',
        'appliance_tftp_requests_refused_total{reason="path"} 0',
        # summed over the workers' rows; every group and class listed
        'appliance_http_requests_total{endpoint_group="boot",code_class="2xx"} 7',
        'appliance_http_requests_total{endpoint_group="images",code_class="4xx"} 1',
        'appliance_http_requests_total{endpoint_group="metrics",code_class="2xx"} 1',
        'appliance_http_requests_total{endpoint_group="api",code_class="1xx"} 1',
        'appliance_http_requests_total{endpoint_group="ui",code_class="5xx"} 0',
        'appliance_machines{state="discovered"} 2',
        'appliance_machines{state="available"} 0',
        'appliance_machines{state="ready"} 1',
        'appliance_machines{state="retired"} 1',
        "appliance_machines_bmc_unreachable 1",
        'appliance_bmc_calls_total{source="request",operation="power",outcome="succeeded"} 2',
        'appliance_bmc_calls_total{source="request",operation="power",outcome="failed"} 1',
        'appliance_bmc_calls_total{source="request",operation="boot",outcome="failed"} 1',
        'appliance_bmc_calls_total{source="request",operation="identify",outcome="failed"} 0',
        'appliance_bmc_calls_total{source="poll",operation="status",outcome="failed"} 1',
        'appliance_bmc_call_failures_total{source="poll",operation="status",kind="auth"} 1',
        'appliance_bmc_call_failures_total{source="request",operation="boot",kind="config"} 1',
        'appliance_bmc_call_failures_total{source="request",operation="power",kind="timeout"} 1',
        'appliance_bmc_call_seconds_bucket{source="request",operation="power",le="0.1"} 0',
        'appliance_bmc_call_seconds_bucket{source="request",operation="power",le="0.25"} 1',
        'appliance_bmc_call_seconds_bucket{source="request",operation="power",le="5.0"} 2',
        'appliance_bmc_call_seconds_bucket{source="request",operation="power",le="30.0"} 2',
        'appliance_bmc_call_seconds_bucket{source="request",operation="power",le="60.0"} 3',
        'appliance_bmc_call_seconds_bucket{source="request",operation="power",le="+Inf"} 3',
        'appliance_bmc_call_seconds_sum{source="request",operation="power"} 34.7',
        'appliance_bmc_call_seconds_count{source="request",operation="power"} 3',
        'appliance_bmc_call_seconds_bucket{source="poll",operation="status",le="0.1"} 1',
        'appliance_bmc_requests_pending{state="queued"} 3',
        'appliance_bmc_requests_pending{state="running"} 0',
        "appliance_bmc_calls_in_flight 2",
        'appliance_part_heartbeat_timestamp_seconds{part="lifecycle"} 1714564801',
        'appliance_part_heartbeat_timestamp_seconds{part="power"} 1714564800',
        'appliance_part_counters_changed_timestamp_seconds{part="dhcp"} 1714564800.0',
        'appliance_part_counters_changed_timestamp_seconds{part="http"} 1714564801.0',
        # no family of their own: generic, nothing dropped, label values escaped
        'appliance_part_counter{part="dhcp",name="some_new_name"} 5',
        'appliance_part_counter{part="http-200",name="odd"} 7',
        'appliance_part_counter{part="lifecycle",name="checks"} 3',
        'appliance_part_counter{part="we\\"ird\\\\",name="x\\ny"} 1',
    ]
    missing = [line for line in expected if line not in lines]
    assert not missing, "\n".join(missing) + "\n---\n" + text
    # a call refused before reaching a BMC has no duration
    assert 'appliance_bmc_call_seconds_count{source="request",operation="boot"}' not in text
    assert text.count("# TYPE appliance_http_requests_total counter\n") == 1


def test_render_output_parses_and_nothing_is_lost() -> None:
    data = sample_data()
    families = promtext.parse(render(data))
    assert all(name.startswith("appliance_") for name in families)
    total = sum(families["appliance_dhcp_packets_received_total"].samples.values())
    assert total == 4 + 3 + 1
    assert families["appliance_http_requests_total"].total(endpoint_group="boot") == 7
    assert families["appliance_part_counter"].value(part="dhcp", name="some_new_name") == 5
    assert families["appliance_bmc_call_seconds"].type == "histogram"


def test_every_dhcp_and_tftp_counter_has_a_family() -> None:
    for name in DHCP_NAMES:
        assert rule_for("dhcp", name) is not None, name
    for name in TFTP_NAMES:
        assert rule_for("tftp", name) is not None, name
    # names the DHCP server makes on the fly: per message type and per malformation
    for name in ("offer", "ack", "nak", "malformed_no_magic_cookie"):
        assert rule_for("dhcp", name) is not None, name
    assert rule_for("dhcp", "brand_new") is None


def test_empty_database_renders() -> None:
    families = promtext.parse(render(MetricsData()))
    assert families["appliance_machines"].total() == 0
    assert "appliance_dhcp_replies_total" not in families  # DHCP never published
    assert "appliance_bmc_calls_total" not in families     # nor the power part


# -- the BMC call counters of the power part --------------------------------------------

def test_call_stats_names() -> None:
    snap = _call_stats()
    assert snap["call:request:power:ok"] == 2
    assert snap["call:request:power:timeout"] == 1
    assert snap["call:request:boot:config"] == 1
    assert "seconds:request:boot:+Inf" not in snap
    assert snap["seconds:request:power:+Inf"] == 3
    assert snap["seconds:request:power:0.25"] == 1
    assert snap["seconds_ms:request:power"] == 200 + 3000 + 31500
    assert stats.parse("call:poll:status:auth") == stats.Name("call", "poll", "status", "auth")
    assert stats.parse("heartbeat") is None and stats.parse("call:x") is None


def test_power_worker_counts_its_calls(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from appliance.power import calls, control
    from appliance.power.worker import PowerWorker
    from tests.unit import test_power as tp

    driver = tp.FakeDriver
    monkeypatch.setattr(driver, "script", {})
    monkeypatch.setattr(driver, "calls", [])
    real = calls.driver_class
    monkeypatch.setattr(calls, "driver_class",
                        lambda name: driver if name == "fake" else real(name))
    monkeypatch.setitem(control.DEFAULT_PORTS, "fake", 623)
    monkeypatch.setattr(control, "DRIVERS", (*calls.DRIVERS, "fake"))
    config = Config(state_dir=str(tmp_path))
    config.power.call_timeout, config.power.attempts, config.power.backoff = 1.0, 1, 0.01
    config.power.poll_interval = 0
    db = Database(config.effective_database_url)
    db.migrate()
    machine_id = tp._machine_with_bmc(config, db, "52:54:00:00:09:01", "192.0.2.91")
    driver.script["192.0.2.91"] = [None, BmcError(AUTH, "wrong password")]
    with db.session() as session:
        machine = session.get(Machine, machine_id)
        control.request(session, machine, "power", {"action": "on"}, "test")
        control.request(session, machine, "status", {}, "test")
    worker = PowerWorker(config, db)
    tp._drain(worker)
    worker.close()
    snap = worker.stats.snapshot()
    assert snap["call:request:power:ok"] == 1
    assert snap["call:request:status:auth"] == 1
    assert snap["seconds:request:power:+Inf"] == 1
    db.dispose()


# -- reading the database --------------------------------------------------------------

@pytest.fixture
def app(tmp_path: Path):  # type: ignore[no-untyped-def]
    config = Config(state_dir=str(tmp_path))
    db = Database(config.effective_database_url)
    db.migrate()
    app = create_app(config, db)
    app.testing = True
    yield app
    db.dispose()


def test_collect_reads_machines_and_pending_requests(app) -> None:  # type: ignore[no-untyped-def]
    db = app.extensions["appliance"].db
    with db.session() as s:
        machines = [Machine(mac=f"52:54:00:00:0a:0{i}", state=state)
                    for i, state in enumerate(["ready", "ready", "failed"])]
        machines[0].bmc_driver, machines[0].power_error = "ipmi", "timeout: no answer"
        machines[1].bmc_driver = "ipmi"
        s.add_all(machines)
        s.flush()
        for state in ("queued", "queued", "running", "succeeded", "failed"):
            s.add(PowerRequest(machine_id=machines[0].id, operation="power", actor="t",
                               state=state))
    publish_counters(db, "dhcp", {"received": 4})
    data = collect(db)
    assert data.machines == {"ready": 2, "failed": 1}
    assert data.bmc_unreachable == 1
    assert data.bmc_pending == {"queued": 2, "running": 1}
    assert data.counters == {"dhcp": {"received": 4}}
    assert set(data.changed_at) == {"dhcp"}


# -- counting HTTP requests ------------------------------------------------------------

def _http_rows(db: Database) -> dict[str, dict[str, int]]:
    return {p: v for p, v in read_counters(db).items() if p.startswith("http-")}


def test_requests_are_counted_by_group_and_class(app) -> None:  # type: ignore[no-untyped-def]
    client = app.test_client()
    assert client.get("/boot/52:54:00:00:0b:01.ipxe").status_code == 200
    assert client.get("/boot/52:54:00:00:0b:01.ipxe").status_code == 200
    assert client.get("/images/discovery/missing").status_code == 404
    assert client.get("/no/such/page").status_code == 404
    assert client.get("/api/v1/machines").status_code == 401
    assert client.get("/healthz").status_code == 200
    assert client.get("/metrics").status_code == 200
    counts = app.extensions[request_counts.EXTENSION]
    assert counts.snapshot() == {"boot_2xx": 2, "images_4xx": 1, "other_4xx": 1,
                                 "api_4xx": 1, "other_2xx": 1, "metrics_2xx": 1}
    db = app.extensions["appliance"].db
    assert _http_rows(db) == {}  # counting alone never writes
    counts.publish(db)
    part = f"http-{os.getpid()}"
    assert _http_rows(db) == {part: counts.snapshot()}
    client.get("/boot/52:54:00:00:0b:01.ipxe")
    text = client.get("/metrics").text  # reads what was published, not the live dict
    assert 'appliance_http_requests_total{endpoint_group="boot",code_class="2xx"} 2\n' in text
    counts.publish(db)
    assert _http_rows(db)[part]["boot_2xx"] == 3
    text = client.get("/metrics").text
    assert 'appliance_http_requests_total{endpoint_group="boot",code_class="2xx"} 3\n' in text


def test_a_reused_pid_adds_to_the_dead_workers_row(app) -> None:  # type: ignore[no-untyped-def]
    db = app.extensions["appliance"].db
    part = request_counts.part_name()
    publish_counters(db, part, {"boot_2xx": 40, "ui_3xx": 2})
    publish_counters(db, "http-1", {"boot_2xx": 1})
    app.test_client().get("/boot/52:54:00:00:0c:01.ipxe")
    app.extensions[request_counts.EXTENSION].publish(db)
    rows = _http_rows(db)
    assert rows[part] == {"boot_2xx": 41, "ui_3xx": 2}
    assert request_counts.forget_workers(db) == 3
    publish_counters(db, "dhcp", {"received": 1})
    assert _http_rows(db) == {} and read_counters(db)["dhcp"] == {"received": 1}


def test_worker_hooks_publish_at_exit(app) -> None:  # type: ignore[no-untyped-def]
    db = app.extensions["appliance"].db
    request_counts.start_in_worker(app)
    app.test_client().get("/healthz")
    request_counts.stop_in_worker(app)
    assert _http_rows(db) == {request_counts.part_name(): {"other_2xx": 1}}
    request_counts.start_in_worker(None)  # a worker whose app did not load: no error
    request_counts.stop_in_worker(None)


def test_endpoint_groups() -> None:
    group = request_counts.endpoint_group
    assert [group(e) for e in ("boot.ipxe_script", "boot.images", "boot.tftp_root_over_http",
                               "install.answer_file", "metadata.nocloud", "api.get_machine",
                               "ui.index", "ui.static", "static", "metrics.scrape",
                               "boot.healthz", None, "nobp")] == [
        "boot", "images", "images", "install", "metadata", "api", "ui", "ui", "ui",
        "metrics", "other", "other", "other"]
    assert request_counts.split_counter_name("images_4xx") == ("images", "4xx")
    assert request_counts.split_counter_name("odd") is None
    assert request_counts.split_counter_name("a_4x") is None


# -- access ------------------------------------------------------------------------------

def test_metrics_refused_outside_metrics_networks(app) -> None:  # type: ignore[no-untyped-def]
    client = app.test_client()
    r = client.get("/metrics", environ_base={"REMOTE_ADDR": "10.250.7.2"})
    assert r.status_code == 403
    assert "http.metrics_networks" in r.text and "10.250.7.2" in r.text
    assert "appliance_" not in r.text
    for allowed in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
        r = client.get("/metrics", environ_base={"REMOTE_ADDR": allowed})
        assert r.status_code == 200, allowed
        assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        promtext.parse(r.text)
    app.extensions["appliance"].config.http.metrics_networks = "10.250.7.0/24"
    assert client.get("/metrics", environ_base={"REMOTE_ADDR": "10.250.7.2"}).status_code == 200
    assert client.get("/metrics").status_code == 403  # loopback no longer listed
    app.extensions["appliance"].config.http.metrics_networks = ""
    r = client.get("/metrics")
    assert r.status_code == 403 and "no one" in r.text


def test_metrics_networks_setting(tmp_path: Path) -> None:
    assert load_config(env={}).http.metrics_networks == "127.0.0.0/8,::1"
    config = load_config(env={"APPLIANCE_HTTP_METRICS_NETWORKS": "10.0.0.0/8, ::1"})
    assert config.http.metrics_networks == "10.0.0.0/8, ::1"
    with pytest.raises(ConfigError, match="http.metrics_networks: 'nope' is not a network"):
        load_config(env={"APPLIANCE_HTTP_METRICS_NETWORKS": "127.0.0.1,nope"})
    shipped = (Path(__file__).parents[2] / "systemd" / "appliance.toml").read_text()
    assert '# metrics_networks = "127.0.0.0/8,::1"' in shipped


def test_cli_counters_sum_the_workers() -> None:
    summed = request_counts.workers_summed({
        "http-10": {"boot_2xx": 2, "api_4xx": 1}, "http-11": {"boot_2xx": 3},
        "dhcp": {"received": 4}})
    assert summed == {"http": {"boot_2xx": 5, "api_4xx": 1}, "dhcp": {"received": 4}}
