"""Baseline for the benchmark only: tftpy's own ``TftpServer``, unmodified.

    python bench/tftp/stock_tftpy.py ROOT ADDRESS [PORT]

Runs until SIGTERM. Not part of the product; it is here so the benchmark can show what
the stock tftpy server does on the same clients and files.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

import tftpy


def main() -> int:
    root, address = sys.argv[1], sys.argv[2]
    port = int(sys.argv[3]) if len(sys.argv) > 3 else 69
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("tftpy").setLevel(logging.CRITICAL)
    server = tftpy.TftpServer(root)
    signal.signal(signal.SIGTERM, lambda *_: server.stop(now=True))
    t = threading.Thread(target=server.listen, args=(address, port), daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
