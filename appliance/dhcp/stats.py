"""Counters of the DHCP part and rate-limited logging of dropped packets."""

from __future__ import annotations

import logging
import time

COUNTER_NAMES = (
    "received", "discover", "request", "decline", "release", "inform", "other_type",
    "offers", "acks", "naks", "sent", "send_errors",
    "dropped_malformed", "dropped_oversized", "dropped_other", "dropped_stale",
    "dropped_overload", "dropped_no_subnet", "dropped_pool_exhausted",
    "dropped_not_for_us", "dropped_not_pxe", "internal_errors",
    "db_commits", "db_errors", "seen_queued", "seen_dropped",
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


class RateLimitedLog:
    """At most ``burst`` records per ``window`` seconds; then one 'suppressed' summary."""

    def __init__(self, logger: logging.Logger, burst: int = 10, window: float = 10.0) -> None:
        self.logger = logger
        self.burst = burst
        self.window = window
        self.window_start = 0.0
        self.emitted = 0
        self.suppressed = 0

    def log(self, level: int, msg: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now - self.window_start >= self.window:
            if self.suppressed:
                self.logger.log(level, "... %d similar messages suppressed in the last %.0fs",
                                self.suppressed, self.window)
            self.window_start = now
            self.emitted = 0
            self.suppressed = 0
        if self.emitted < self.burst:
            self.emitted += 1
            self.logger.log(level, msg, *args, exc_info=exc_info)
        else:
            self.suppressed += 1
