"""Rate-limited logging for servers that must not write a log line per bad packet."""

from __future__ import annotations

import logging
import time


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
