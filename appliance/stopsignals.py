"""SIGTERM/SIGINT set a part's stop event, for as long as the part runs."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def stop_on_signals(stop: threading.Event, part: str, log: logging.Logger) -> Iterator[None]:
    """While inside, SIGTERM and SIGINT set ``stop`` (logged once); the previous handlers
    come back afterwards. Off the main thread (tests running a part in a thread) signals
    cannot be handled, so nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        if not stop.is_set():
            log.info("received %s, stopping %s", signal.Signals(signum).name, part)
        stop.set()

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)
