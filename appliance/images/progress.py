"""Transfer progress on stderr: a redrawn bar on a terminal, a plain line now and then
otherwise (logs and CI), nothing when quiet."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


class Progress:
    """Does nothing; the interface the fetcher calls."""

    def start(self, label: str, total: int, done: int = 0, verb: str = "downloading") -> None:
        """``total`` 0 means unknown; ``done`` is what a resumed transfer already has."""

    def update(self, done: int) -> None:
        """``done`` bytes of the whole file are there now."""

    def finish(self) -> None:
        """The transfer ended (successfully or not)."""


class StreamProgress(Progress):
    """A bar on a TTY, else a line every ``interval`` seconds and at the end."""

    def __init__(self, stream: TextIO | None = None, interval: float = 5.0,
                 tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval
        self.label = ""
        self.total = 0
        self.done = 0
        self.started = 0.0
        self.first = 0
        self.last_draw = 0.0

    def start(self, label: str, total: int, done: int = 0, verb: str = "downloading") -> None:
        self.label, self.total, self.done, self.first = label, total, done, done
        self.started = self.last_draw = time.monotonic()
        if not self.tty:
            resumed = f", resuming at {_human(done)}" if done else ""
            size = _human(total) if total else "unknown size"
            self.stream.write(f"{label}: {verb} ({size}{resumed})\n")
            self.stream.flush()

    def _line(self) -> tuple[str, float]:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = (self.done - self.first) / elapsed
        if self.total:
            pct = min(self.done / self.total, 1.0)
            return (f"{self.label}: {pct * 100:5.1f}% {_human(self.done)} of "
                    f"{_human(self.total)} at {_human(rate)}/s"), pct
        return f"{self.label}: {_human(self.done)} at {_human(rate)}/s", -1.0

    def update(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if self.tty:
            if now - self.last_draw < 0.1:
                return
            self.last_draw = now
            text, pct = self._line()
            if pct >= 0:
                width = 30
                filled = int(width * pct)
                text = f"[{'#' * filled}{'.' * (width - filled)}] {text}"
            self.stream.write("\r" + text + "\x1b[K")
            self.stream.flush()
        elif now - self.last_draw >= self.interval:
            self.last_draw = now
            self.stream.write(self._line()[0] + "\n")
            self.stream.flush()

    def finish(self) -> None:
        text = self._line()[0]
        self.stream.write(("\r" + text + "\x1b[K\n") if self.tty else text + "\n")
        self.stream.flush()
