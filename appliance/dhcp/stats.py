"""Counters of the DHCP part."""

from __future__ import annotations

COUNTER_NAMES = (
    "received", "discover", "request", "decline", "release", "inform", "other_type",
    "offers", "acks", "naks", "sent", "send_errors",
    "dropped_malformed", "dropped_oversized", "dropped_other", "dropped_stale",
    "dropped_overload", "dropped_no_subnet", "dropped_pool_exhausted",
    "dropped_not_for_us", "dropped_not_pxe", "internal_errors",
    "db_commits", "db_errors", "seen_queued", "seen_dropped", "timeline_dropped",
)


class Counters(dict[str, int]):
    """Running totals; every name exists from the start so readers can copy safely."""

    def __init__(self) -> None:
        super().__init__((name, 0) for name in COUNTER_NAMES)

    def inc(self, name: str, n: int = 1) -> None:
        self[name] = self.get(name, 0) + n

    def snapshot(self) -> dict[str, int]:
        for _ in range(5):
            try:
                return dict(self)
            except RuntimeError:  # a key was added while copying (other thread)
                continue
        return dict(self)
