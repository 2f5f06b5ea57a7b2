"""Counters of the BMC calls the power part makes: operators' and the lifecycle's requests
and the power state polls; how many, how each ended, how long it took.

Kept in memory (a few dict increments per call, which takes tenths of a second to
minutes anyway), published with the part's heartbeat as part ``power`` and read by
``/metrics``. Totals since the power part started, so reading them costs the same
however many requests the database holds. Counter names, one scheme in one place
(:func:`parse`):

- ``call:<source>:<operation>:<end>``: calls that ended; ``end`` is ``ok`` or the error
  kind (``timeout``, ``connection``, ``auth``, ``config``, ...);
- ``seconds:<source>:<operation>:<bound>``: calls that reached a BMC and took at most
  ``bound`` seconds (cumulative; bound ``+Inf`` counts them all). A call refused before
  it reached a BMC (incomplete settings: kind ``config``) has no duration;
- ``seconds_ms:<source>:<operation>``: the total duration of those, in milliseconds.

``source`` is ``request`` or ``poll``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from appliance.power.calls import CallOutcome

#: Upper bounds (seconds) of the latency buckets; an attempt's deadline is
#: ``power.call_timeout`` (10 s), and a call makes up to ``power.attempts`` of them.
BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BOUNDS = (*(repr(b) for b in BUCKETS), "+Inf")
REQUEST, POLL = "request", "poll"
OK = "ok"


@dataclass(frozen=True)
class Name:
    """A parsed counter name."""

    what: str          # call | seconds | seconds_ms
    source: str
    operation: str
    detail: str = ""   # call: ok or the error kind; seconds: the bound


def parse(name: str) -> Name | None:
    """The parts of a name made here; None for any other name (``heartbeat``, ...)."""
    what, *rest = name.split(":")
    if what in ("call", "seconds") and len(rest) == 3 and all(rest):
        return Name(what, *rest)
    if what == "seconds_ms" and len(rest) == 2 and all(rest):
        return Name(what, *rest)
    return None


class CallStats:
    """Thread-safe totals; ``observe`` is called once per call by the worker threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def observe(self, source: str, operation: str, outcome: CallOutcome) -> None:
        end = OK if outcome.ok else (outcome.error.kind if outcome.error else "unknown")
        names = [f"call:{source}:{operation}:{end}"]
        if outcome.attempts:
            for bucket, bound in zip(BUCKETS, BOUNDS, strict=False):
                if outcome.duration <= bucket:
                    names.append(f"seconds:{source}:{operation}:{bound}")
            names.append(f"seconds:{source}:{operation}:+Inf")
        millis = round(outcome.duration * 1000) if outcome.attempts else 0
        with self._lock:
            counts = self._counts
            for name in names:
                counts[name] = counts.get(name, 0) + 1
            if outcome.attempts:
                key = f"seconds_ms:{source}:{operation}"
                counts[key] = counts.get(key, 0) + millis

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)
