"""What ``/metrics`` reports, read from the database in one short session.

Four small queries, none of which reads a table that grows without bound: the
``counters`` table (every part's running totals, the BMC call counts and latencies among
them: ``power/stats.py``), machines by state, machines whose BMC did not answer their
last power poll, and the power requests still queued or running (by the index on
``power_requests.state``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from appliance.db import Database
from appliance.models import Counter, Machine, PowerRequest

#: Power request states counted as pending.
PENDING = ("queued", "running")


@dataclass
class MetricsData:
    #: part -> counter name -> value
    counters: dict[str, dict[str, int]] = field(default_factory=dict)
    #: part -> last time any of its counters changed (UTC)
    changed_at: dict[str, dt.datetime] = field(default_factory=dict)
    #: machine state -> number of machines
    machines: dict[str, int] = field(default_factory=dict)
    #: machines with a BMC whose last power poll failed
    bmc_unreachable: int = 0
    #: power request state (queued, running) -> number of requests
    bmc_pending: dict[str, int] = field(default_factory=dict)


def collect(db: Database) -> MetricsData:
    with db.session() as session:
        return read(session)


def read(session: Session) -> MetricsData:
    data = MetricsData()
    rows = session.execute(select(Counter.part, Counter.name, Counter.value,
                                  Counter.updated_at).order_by(Counter.part, Counter.name))
    for part, name, value, updated_at in rows:
        data.counters.setdefault(part, {})[name] = int(value)
        if updated_at is not None and (part not in data.changed_at
                                       or updated_at > data.changed_at[part]):
            data.changed_at[part] = updated_at
    data.machines = {state: int(n) for state, n in session.execute(
        select(Machine.state, func.count()).group_by(Machine.state))}
    data.bmc_unreachable = int(session.scalar(
        select(func.count()).select_from(Machine)
        .where(Machine.bmc_driver.is_not(None), Machine.power_error.is_not(None))) or 0)
    data.bmc_pending = {state: int(n) for state, n in session.execute(
        select(PowerRequest.state, func.count()).where(PowerRequest.state.in_(PENDING))
        .group_by(PowerRequest.state))}
    return data
