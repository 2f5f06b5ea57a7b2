"""One TFTP worker process: ``python -m appliance.tftp.worker``, started by server.run().

Protocol with the supervisor, over pipes:

* stdin: one JSON line ``{"tftp": {...TftpConfig fields...}, "log_level": "INFO",
  "index": N}``; after that, EOF on stdin (the supervisor closed it or died) means stop.
* stdout: a JSON line of this worker's running counter totals about every second while
  they change, with the transfers that ended since the last line under ``transfers``
  (for the boot timeline), then a final line on the way out. Logs go to stderr, shared with the
  supervisor.
* SIGTERM / SIGINT also stop the worker (it shares the supervisor's process group).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys

from appliance.config import TftpConfig
from appliance.tftp.engine import Engine
from appliance.tftp.transfer_events import TRANSFERS_KEY

log = logging.getLogger("appliance.tftp")


def main() -> int:
    line = sys.stdin.buffer.readline()
    if not line:
        return 1
    spec = json.loads(line)
    cfg = TftpConfig(**spec["tftp"])
    logging.basicConfig(
        level=getattr(logging, str(spec.get("log_level", "INFO")).upper(), logging.INFO),
        format=f"%(asctime)s %(name)s[w{spec.get('index', 0)}] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("tftpy").setLevel(logging.WARNING)
    stopping = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    engine = Engine(cfg, reuse_port=True)
    try:
        engine.open()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", cfg.bind, cfg.port, exc)
        return 3
    engine.watch_for_eof(sys.stdin.fileno())
    last: dict[str, int] = {}

    def export() -> None:
        nonlocal last
        finished = engine.take_finished()
        if engine.counters != last or finished:
            last = dict(engine.counters)
            try:
                out.write(json.dumps({**last, TRANSFERS_KEY: finished}) + "\n")
            except OSError:
                pass

    try:
        engine.serve(lambda: stopping, on_tick=export, tick=1.0)
    finally:
        engine.close()
        export()
    return 0


if __name__ == "__main__":
    sys.exit(main())
