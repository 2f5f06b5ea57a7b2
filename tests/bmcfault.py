"""A UDP fault proxy to put in front of a (simulated) BMC: the network misbehaving on purpose.

    with FaultProxy(bmc.port, mode="drop-alternate") as proxy:
        bmc.ipmitool("chassis", "power", "status", port=proxy.port)
        proxy.counts()   # {"requests": 9, "requests_dropped": 5, ...}

The proxy listens on 127.0.0.1:<free port> (of a :class:`tests.netns.Namespace` if one is
given: its thread enters the namespace before opening sockets) and relays datagrams to the
BMC's port, one upstream socket per client address, so replies reach the client that asked
and several clients can share one proxy. It runs in a daemon thread; ``stop()`` (or leaving
the ``with``) ends it and closes every socket. The mode can be changed while it runs
(``proxy.set_mode("blackhole")``: a BMC that stops answering mid-operation).

Modes:

``pass``
    relay everything unchanged (to count packets).
``blackhole``
    swallow every request; nothing reaches the BMC, nothing comes back (a BMC that is
    off the network, or a wrong address). Clients time out.
``delay``
    relay every datagram, in both directions, ``delay`` seconds after it arrived (order
    kept), so each request/response exchange takes 2 x ``delay`` longer.
``drop-alternate``
    drop every other IPMI message *inside a session* (RMCP+ payload type "IPMI message" or
    an IPMI 1.5 packet, with a non-zero session ID): ``drop="requests"`` (default) drops
    the 1st, 3rd, 5th ... such client-to-BMC datagram and relays every reply, so every
    command needs exactly one retransmission and a client that retries gets its answer;
    ``"replies"`` does the same to BMC-to-client datagrams (the BMC then executes the
    retransmitted command again: ipmi_sim ran ``set power 1`` twice for one ``ipmitool
    chassis power on``); ``"both"`` alternates in each direction independently. The
    alternation counts all clients of the proxy together (one client alone sees exactly
    every other message lost). Session set-up (Get Channel Authentication Capabilities,
    Open Session, RAKP 1-4) and RMCP pings always pass: with strict alternation of
    *every* datagram (``drop_handshake=True``) ipmitool 1.8.19 got no session at all in
    any of the three direction modes (with ``requests``: after a lost RAKP 1 it restarts
    with Open Session + RAKP 1, two datagrams, so its RAKP 1 lands on a dropped slot
    every time).

A wrong password needs no proxy: give the client a wrong password.

Counts (``counts()``): ``requests``/``replies`` received from the client / the BMC,
``*_relayed`` sent on, ``*_dropped`` swallowed; ``clients`` the number of client
addresses seen.
"""

from __future__ import annotations

import heapq
import itertools
import selectors
import socket
import threading
import time
from typing import Any

from tests.netns import Namespace

MODES = ("pass", "blackhole", "delay", "drop-alternate")
DROP_DIRECTIONS = ("requests", "replies", "both")
HOST = "127.0.0.1"


def in_session(data: bytes) -> bool:
    """An IPMI message inside an established session (not set-up, not an RMCP ping)."""
    if len(data) < 10 or data[0] != 0x06 or data[3] != 0x07:     # RMCP, class IPMI
        return False
    if data[4] == 0x06:                                           # IPMI 2.0 / RMCP+
        payload = data[5] & 0x3F
        session_id = int.from_bytes(data[6:10], "little")
        return payload == 0x00 and session_id != 0
    if len(data) < 13:                                            # IPMI 1.5
        return False
    return int.from_bytes(data[9:13], "little") != 0


class FaultProxy:
    def __init__(self, target_port: int, mode: str = "pass", delay: float = 1.0,
                 drop: str = "requests", target_host: str = HOST, listen_host: str = HOST,
                 ns: Namespace | None = None, drop_handshake: bool = False) -> None:
        self.target = (target_host, target_port)
        self.listen_host = listen_host
        self.ns = ns
        self.drop_handshake = drop_handshake
        self.port = 0
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(
            ("requests", "requests_relayed", "requests_dropped",
             "replies", "replies_relayed", "replies_dropped"), 0)
        self._seen = {"requests": 0, "replies": 0}     # for drop-alternate parity
        self.set_mode(mode, delay=delay, drop=drop)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._clients: dict[tuple[str, int], socket.socket] = {}

    # -- control
    def set_mode(self, mode: str, delay: float | None = None, drop: str | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} not in {MODES}")
        if drop is not None and drop not in DROP_DIRECTIONS:
            raise ValueError(f"drop {drop!r} not in {DROP_DIRECTIONS}")
        with self._lock:
            self.mode = mode
            if delay is not None:
                self.delay = float(delay)
            if drop is not None:
                self.drop = drop

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {**self._counts, "clients": len(self._clients)}

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._run, name=f"bmcfault-{self.target[1]}",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        if self._error:
            raise self._error
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- the relay
    def _decide(self, direction: str, data: bytes) -> str:
        """Count one datagram; 'relay', 'drop' or 'delay'."""
        droppable = self.drop_handshake or in_session(data)
        with self._lock:
            self._counts[direction] += 1
            mode = self.mode
            if mode == "blackhole":
                verdict = "drop"
            elif mode == "delay":
                verdict = "delay"
            elif (mode == "drop-alternate" and self.drop in (direction, "both")
                  and droppable):
                self._seen[direction] += 1
                verdict = "drop" if self._seen[direction] % 2 == 1 else "relay"
            else:
                verdict = "relay"
            if verdict == "drop":
                self._counts[f"{direction}_dropped"] += 1
            else:
                self._counts[f"{direction}_relayed"] += 1
            return verdict

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        listener: socket.socket | None = None
        try:
            if self.ns is not None:
                from tests.ipmisim import enter_netns
                enter_netns(self.ns.name)
            listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            listener.bind((self.listen_host, 0))
            listener.setblocking(False)
            self.port = listener.getsockname()[1]
            sel.register(listener, selectors.EVENT_READ, None)
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        pending: list[tuple[float, int, socket.socket, bytes, tuple[str, int] | None]] = []
        seq = itertools.count()
        try:
            while not self._stop.is_set():
                timeout = 0.05
                if pending:
                    timeout = max(0.0, min(timeout, pending[0][0] - time.monotonic()))
                for key, _ in sel.select(timeout):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    try:
                        data, addr = sock.recvfrom(65535)
                    except (BlockingIOError, ConnectionRefusedError):
                        continue
                    if key.data is None:            # from a client
                        up = self._clients.get(addr)
                        if up is None:
                            up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                            up.bind((self.listen_host, 0))
                            up.connect(self.target)
                            up.setblocking(False)
                            with self._lock:
                                self._clients[addr] = up
                            sel.register(up, selectors.EVENT_READ, addr)
                        out, dest = up, None
                        verdict = self._decide("requests", data)
                    else:                           # from the BMC, for client key.data
                        out, dest = listener, key.data
                        verdict = self._decide("replies", data)
                    if verdict == "relay":
                        self._send(out, data, dest)
                    elif verdict == "delay":
                        heapq.heappush(pending, (time.monotonic() + self.delay, next(seq),
                                                 out, data, dest))
                now = time.monotonic()
                while pending and pending[0][0] <= now:
                    _, _, out, data, dest = heapq.heappop(pending)
                    self._send(out, data, dest)
        finally:
            sel.close()
            listener.close()
            with self._lock:
                for up in self._clients.values():
                    up.close()

    @staticmethod
    def _send(sock: socket.socket, data: bytes, dest: tuple[str, int] | None) -> None:
        try:
            if dest is None:
                sock.send(data)
            else:
                sock.sendto(data, dest)
        except OSError:
            pass    # the BMC's port closed (ICMP unreachable) or the client went away
