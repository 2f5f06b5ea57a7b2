"""How the CLI prints rows, locally and over the API: one function per shape, so
``appliance machines`` looks the same whichever side made the rows."""

from __future__ import annotations

import json
from typing import Any

MACHINES = ["mac", "hostname", "state", "phase", "bootenv", "address", "power_state", "arch",
            "seen_on", "last_seen_at"]
LEASES = ["ip", "mac", "state", "hostname", "expires_at"]
EVENTS = ["at", "mac", "actor", "kind", "message"]
SUBNETS = ["network", "pool_start", "pool_end", "router", "dns_servers", "lease_seconds",
           "next_server"]
RESERVATIONS = ["mac", "ip", "hostname"]
PROFILES = ["name", "description", "params"]
BOOTENVS = ["name", "os", "firmware", "files", "artifacts", "images"]


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def profile_table(rows: list[dict[str, Any]]) -> str:
    """Profiles with their param names (``listing.profile_rows`` has the values)."""
    return table([{**r, "params": ", ".join(sorted(r.get("params") or {}))} for r in rows],
                 PROFILES)


def record(row: dict[str, Any]) -> str:
    """One object as ``key: value`` lines (``appliance machine show``)."""
    lines = []
    for key, value in row.items():
        shown = json.dumps(value) if isinstance(value, dict | list) else value
        lines.append(f"{key + ':':22} {'' if shown is None else shown}")
    return "\n".join(lines)


TIMELINE = ["phase", "status", "took", "detail"]


def timeline(data: dict[str, Any]) -> str:
    """A machine's boot timeline (``Timeline.as_dict()``, local or from the API)."""
    if data.get("outcome") == "none":
        return "no provisioning run yet"
    head = (f"deployment {data.get('deployment') or '?'} with {data.get('bootenv')}, "
            f"started {str(data.get('started'))[:19]}: {data.get('outcome')} after "
            f"{data.get('seconds')} s")
    rows = []
    for p in data.get("phases", []):
        detail = "; ".join([p.get("detail") or "", *p.get("problems", [])]).strip("; ")
        rows.append({"phase": p.get("label"), "status": p.get("status"),
                     "took": "" if p.get("seconds") is None else f"{p['seconds']} s",
                     "detail": detail})
    return head + "\n" + table(rows, TIMELINE)


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, default=str)
