"""The ``/metrics`` families and how the stored data maps onto them: ``render(data)``
is a pure function from :class:`MetricsData` to the exposition text.

The DHCP, TFTP and BMC call counters are totals since that part's process started (a
restart is a counter reset); HTTP requests are summed over the rows of every gunicorn
worker (``request_counts.py``); machines and pending BMC requests are counted in their
tables. Every counter a part publishes appears somewhere: the ones without a family of
their own go out as ``appliance_part_counter{part,name}``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping

from appliance.lifecycle.states import STATES
from appliance.power import stats
from appliance.power.calls import OPERATIONS
from appliance.web.exposition import Family, exposition
from appliance.web.metrics_data import PENDING, MetricsData
from appliance.web.request_counts import CODE_CLASSES, GROUPS, PART_PREFIX, split_counter_name

#: name -> (type, help). The order here is the order of the output.
FAMILIES: dict[str, tuple[str, str]] = {
    "appliance_dhcp_datagrams_received_total": (
        "counter", "DHCP datagrams read, malformed ones included."),
    "appliance_dhcp_packets_received_total": (
        "counter", "Decoded DHCP messages received, by message type."),
    "appliance_dhcp_replies_total": (
        "counter", "DHCP replies made, by type (an ACK whose lease could not be stored "
        "is made but not sent)."),
    "appliance_dhcp_replies_sent_total": ("counter", "DHCP datagrams sent."),
    "appliance_dhcp_send_errors_total": ("counter", "DHCP replies the kernel refused to send."),
    "appliance_dhcp_dropped_total": (
        "counter", "DHCP packets not answered, by reason. Reasons overlap: other counts "
        "every request refused by the handler, pool_exhausted among them; overload is "
        "what the kernel dropped from the socket queue."),
    "appliance_dhcp_malformed_total": (
        "counter", "Malformed DHCP packets by what was wrong (their sum is "
        "appliance_dhcp_dropped_total{reason=\"malformed\"})."),
    "appliance_dhcp_internal_errors_total": (
        "counter", "DHCP packets whose handling failed with an unexpected error."),
    "appliance_dhcp_db_commits_total": ("counter", "Lease transactions the DHCP part committed."),
    "appliance_dhcp_db_errors_total": ("counter", "Lease transactions that failed."),
    "appliance_dhcp_timeline_events_dropped_total": (
        "counter", "DHCP exchanges of machines being provisioned not written as timeline "
        "events (queue full or the database failed)."),
    "appliance_dhcp_sightings_total": (
        "counter", "Machines seen by DHCP queued for registration, or dropped because the "
        "queue was full."),
    "appliance_tftp_requests_total": ("counter", "Well-formed TFTP read/write requests."),
    "appliance_tftp_requests_refused_total": (
        "counter", "TFTP requests answered with an error, by reason."),
    "appliance_tftp_transfers_started_total": ("counter", "TFTP transfers started."),
    "appliance_tftp_transfers_total": (
        "counter", "TFTP transfers ended, by outcome (tsize_probe: the client asked only "
        "for the size, as UEFI firmware does)."),
    "appliance_tftp_bytes_sent_total": (
        "counter", "TFTP payload bytes sent, retransmissions included; added when a "
        "transfer ends."),
    "appliance_tftp_retransmits_total": ("counter", "TFTP DATA packets sent again."),
    "appliance_tftp_dropped_total": (
        "counter", "TFTP datagrams dropped unanswered, by reason."),
    "appliance_http_requests_total": (
        "counter", "HTTP responses by endpoint group and status class, summed over the "
        "gunicorn workers (each publishes every 5 s); reset when the HTTP part starts."),
    "appliance_machines": ("gauge", "Machines by lifecycle state."),
    "appliance_machines_bmc_unreachable": (
        "gauge", "Machines with a BMC whose last power state poll failed."),
    "appliance_bmc_calls_total": (
        "counter", "BMC calls ended, by source (request: asked by an operator or the "
        "lifecycle; poll: power state polling), operation and outcome. Totals since the "
        "power part started."),
    "appliance_bmc_call_failures_total": (
        "counter", "Failed BMC calls by source, operation and error kind (timeout, "
        "connection, auth, protocol, refused, unsupported, config)."),
    "appliance_bmc_call_seconds": (
        "histogram", "Duration of the BMC calls that reached a BMC, all attempts and "
        "backoff included. Since the power part started."),
    "appliance_bmc_requests_pending": ("gauge", "BMC requests queued or running."),
    "appliance_bmc_calls_in_flight": (
        "gauge", "BMC calls the power part is running, power state polls included."),
    "appliance_part_heartbeat_timestamp_seconds": (
        "gauge", "Unix time of the last heartbeat of a part that has one (power, "
        "lifecycle): a part that stopped shows an old value."),
    "appliance_part_counters_changed_timestamp_seconds": (
        "gauge", "Unix time a part's published counters last changed."),
    "appliance_part_counter": (
        "untyped", "A published counter without a family of its own (syslog, lifecycle, "
        "new names), as the part publishes it: mostly totals since the part started."),
}

Rule = tuple[str, dict[str, str]]
_PKT = "appliance_dhcp_packets_received_total"
_REPLIES = "appliance_dhcp_replies_total"
DHCP_COUNTERS: dict[str, Rule] = {
    "received": ("appliance_dhcp_datagrams_received_total", {}),
    **{t: (_PKT, {"type": t}) for t in ("discover", "request", "decline", "release",
                                         "inform", "offer", "ack", "nak")},
    "other_type": (_PKT, {"type": "other"}),
    "offers": (_REPLIES, {"type": "offer"}),
    "acks": (_REPLIES, {"type": "ack"}),
    "naks": (_REPLIES, {"type": "nak"}),
    "sent": ("appliance_dhcp_replies_sent_total", {}),
    "send_errors": ("appliance_dhcp_send_errors_total", {}),
    "internal_errors": ("appliance_dhcp_internal_errors_total", {}),
    "db_commits": ("appliance_dhcp_db_commits_total", {}),
    "db_errors": ("appliance_dhcp_db_errors_total", {}),
    "seen_queued": ("appliance_dhcp_sightings_total", {"outcome": "queued"}),
    "seen_dropped": ("appliance_dhcp_sightings_total", {"outcome": "dropped"}),
    "timeline_dropped": ("appliance_dhcp_timeline_events_dropped_total", {}),
}
#: name prefix -> (family, label): ``dropped_stale`` -> dropped_total{reason="stale"}
DHCP_PREFIXES = (("dropped_", "appliance_dhcp_dropped_total", "reason"),
                 ("malformed_", "appliance_dhcp_malformed_total", "reason"))

_REFUSED = "appliance_tftp_requests_refused_total"
_TRANSFERS = "appliance_tftp_transfers_total"
TFTP_COUNTERS: dict[str, Rule] = {
    "requests": ("appliance_tftp_requests_total", {}),
    "refused_writes": (_REFUSED, {"reason": "write"}),
    "refused_paths": (_REFUSED, {"reason": "path"}),
    "not_found": (_REFUSED, {"reason": "not_found"}),
    "bad_requests": (_REFUSED, {"reason": "bad_request"}),
    "transfers_started": ("appliance_tftp_transfers_started_total", {}),
    "transfers_completed": (_TRANSFERS, {"outcome": "completed"}),
    "transfers_failed": (_TRANSFERS, {"outcome": "failed"}),
    "transfers_aborted_by_client": (_TRANSFERS, {"outcome": "aborted_by_client"}),
    "tsize_probes": (_TRANSFERS, {"outcome": "tsize_probe"}),
    "bytes_sent": ("appliance_tftp_bytes_sent_total", {}),
    "retransmits": ("appliance_tftp_retransmits_total", {}),
    "malformed_dropped": ("appliance_tftp_dropped_total", {"reason": "malformed"}),
}

OUTCOMES = ("succeeded", "failed")
POWER_COUNTERS: dict[str, Rule] = {
    "in_flight": ("appliance_bmc_calls_in_flight", {}),
}


def rule_for(part: str, name: str) -> Rule | None:
    """Where counter ``name`` of ``part`` goes; None: ``appliance_part_counter``."""
    if name == "heartbeat":
        return "appliance_part_heartbeat_timestamp_seconds", {"part": part}
    if part == "dhcp":
        rule = DHCP_COUNTERS.get(name)
        if rule is not None:
            return rule
        for prefix, family, label in DHCP_PREFIXES:
            if name.startswith(prefix) and len(name) > len(prefix):
                return family, {label: name[len(prefix):]}
    elif part == "tftp":
        return TFTP_COUNTERS.get(name)
    elif part == "power":
        return POWER_COUNTERS.get(name)
    return None


def _is_bmc_call_counter(part: str, name: str) -> bool:
    """A name ``power/stats.py`` made (rendered by ``_bmc_calls``)."""
    if part != "power":
        return False
    parsed = stats.parse(name)
    return parsed is not None and (parsed.what != "seconds" or parsed.detail in stats.BOUNDS)


class _Families:
    def __init__(self) -> None:
        self.by_name = {name: Family(name, kind, text)
                        for name, (kind, text) in FAMILIES.items()}

    def __getitem__(self, name: str) -> Family:
        return self.by_name[name]


def render(data: MetricsData) -> str:
    families = _Families()
    http: dict[tuple[str, str], int] = {(g, c): 0 for g in GROUPS for c in CODE_CLASSES}
    for part, values in sorted(data.counters.items()):
        for name, value in sorted(values.items()):
            if part.startswith(PART_PREFIX) and (key := split_counter_name(name)):
                http[key] = http.get(key, 0) + value
            elif _is_bmc_call_counter(part, name):
                pass  # _bmc_calls below
            elif (rule := rule_for(part, name)) is not None:
                families[rule[0]].add(value, rule[1])
            else:
                families["appliance_part_counter"].add(value, {"part": part, "name": name})
    for (group, code_class), value in http.items():
        families["appliance_http_requests_total"].add(
            value, {"endpoint_group": group, "code_class": code_class})
    _machines(families, data)
    _bmc_calls(families, data.counters.get("power"))
    for state in PENDING:
        families["appliance_bmc_requests_pending"].add(data.bmc_pending.get(state, 0),
                                                       {"state": state})
    _changed(families, data.changed_at)
    return exposition(families.by_name.values())


def _machines(families: _Families, data: MetricsData) -> None:
    for state in _known_first(STATES, data.machines):
        families["appliance_machines"].add(data.machines.get(state, 0), {"state": state})
    families["appliance_machines_bmc_unreachable"].add(data.bmc_unreachable)


def _bmc_calls(families: _Families, power: Mapping[str, int] | None) -> None:
    """The power part's call counters (``power/stats.py``); nothing if it never ran."""
    if power is None:
        return
    ends: dict[tuple[str, str, str], int] = {}
    seconds: dict[tuple[str, str], dict[str, int]] = {}
    millis: dict[tuple[str, str], int] = {}
    for name, value in power.items():
        parsed = stats.parse(name)
        if parsed is None or not _is_bmc_call_counter("power", name):
            continue
        key = (parsed.source, parsed.operation)
        if parsed.what == "call":
            ends[(*key, parsed.detail)] = value
        elif parsed.what == "seconds":
            seconds.setdefault(key, {})[parsed.detail] = value
        else:
            millis[key] = value
    calls: dict[tuple[str, str, str], int] = {
        (stats.REQUEST, op, outcome): 0 for op in OPERATIONS for outcome in OUTCOMES}
    calls.update({(stats.POLL, "status", outcome): 0 for outcome in OUTCOMES})
    failures = families["appliance_bmc_call_failures_total"]
    for (source, op, end), n in sorted(ends.items()):
        outcome = "succeeded" if end == stats.OK else "failed"
        calls[source, op, outcome] = calls.get((source, op, outcome), 0) + n
        if end != stats.OK:
            failures.add(n, {"source": source, "operation": op, "kind": end})
    for (source, op, outcome), n in calls.items():
        families["appliance_bmc_calls_total"].add(
            n, {"source": source, "operation": op, "outcome": outcome})
    histogram = families["appliance_bmc_call_seconds"]
    for (source, op), buckets in sorted(seconds.items()):
        labels = {"source": source, "operation": op}
        for bound in stats.BOUNDS:
            histogram.add(buckets.get(bound, 0), {**labels, "le": bound}, "_bucket")
        histogram.add(millis.get((source, op), 0) / 1000, labels, "_sum")
        histogram.add(buckets.get("+Inf", 0), labels, "_count")


def _changed(families: _Families, changed_at: Mapping[str, dt.datetime]) -> None:
    latest: dict[str, dt.datetime] = {}
    for part, at in changed_at.items():
        name = "http" if part.startswith(PART_PREFIX) else part
        if name not in latest or at > latest[name]:
            latest[name] = at
    for part, at in sorted(latest.items()):
        stamp = at.replace(tzinfo=dt.UTC) if at.tzinfo is None else at
        families["appliance_part_counters_changed_timestamp_seconds"].add(
            round(stamp.timestamp(), 3), {"part": part})


def _known_first(known: Iterable[str], present: Iterable[str]) -> list[str]:
    """The known names in their order, then any others present, sorted."""
    known = list(known)
    return known + sorted(set(present) - set(known))
