"""The TFTP engine and run() on loopback: tftpy's client and hand-made datagrams.

Loopback only (127.0.0.1, a free port), no namespaces: these run anywhere in seconds.
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tftpy
from tftpy.TftpPacketFactory import TftpPacketFactory
from tftpy.TftpPacketTypes import TftpPacketERR, TftpPacketOACK, TftpPacketRRQ, TftpPacketWRQ

from appliance.config import Config, TftpConfig
from appliance.db import Database, read_counters
from appliance.tftp import server
from appliance.tftp.engine import Engine

factory = TftpPacketFactory()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    (r / "multi.bin").write_bytes(os.urandom(100_000))
    (r / "exact.bin").write_bytes(os.urandom(512 * 8))
    (r / "empty.bin").write_bytes(b"")
    (tmp_path / "secret").write_text("secret")
    return r


class Running:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.stop = threading.Event()
        self.thread = threading.Thread(target=engine.serve, args=(self.stop.is_set,))

    @property
    def addr(self) -> tuple[str, int]:
        assert self.engine.bound is not None
        return self.engine.bound


@pytest.fixture
def running(root: Path) -> Iterator[Running]:
    cfg = TftpConfig(bind="127.0.0.1", port=0, root=str(root), timeout=0.3, retries=2,
                     workers=1)
    engine = Engine(cfg)
    engine.open()
    r = Running(engine)
    r.thread.start()
    try:
        yield r
    finally:
        r.stop.set()
        r.thread.join(5)
        engine.close()


def client_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(3)
    return s


def rrq_bytes(name: str, options: dict[str, str] | None = None, mode: str = "octet") -> bytes:
    if mode != "octet":                 # tftpy encodes octet requests only
        return b"\x00\x01" + name.encode() + b"\0" + mode.encode() + b"\0"
    pkt = TftpPacketRRQ()
    pkt.filename, pkt.mode, pkt.options = name, mode, options or {}
    return pkt.encode().buffer


def fetch_raw(addr: tuple[str, int], name: str, options: dict[str, str] | None = None,
              mode: str = "octet") -> tuple[bytes, dict[str, str]]:
    """A minimal lock-step client: returns the data and the OACK options (if any)."""
    s = client_socket()
    s.sendto(rrq_bytes(name, options, mode), addr)
    data, oack = b"", {}
    blksize = int(options.get("blksize", 512)) if options else 512
    expect = 1
    while True:
        pkt, tid = s.recvfrom(70000)
        p = factory.parse(pkt)
        if isinstance(p, TftpPacketOACK):
            oack = dict(p.options)
            blksize = int(oack.get("blksize", 512))
            s.sendto(struct.pack("!HH", 4, 0), tid)
            continue
        if isinstance(p, TftpPacketERR):
            raise RuntimeError(f"ERROR {p.errorcode}")
        assert p.blocknumber == expect & 0xFFFF
        data += p.data
        s.sendto(struct.pack("!HH", 4, p.blocknumber), tid)
        expect += 1
        if len(p.data) < blksize:
            s.close()
            return data, oack


def wait_counter(engine: Engine, name: str, value: int, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while engine.counters[name] < value and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.counters[name] >= value, engine.counters


def test_tftpy_client_fetches_with_blksize_and_tsize(running: Running, root: Path) -> None:
    seen: list[object] = []
    client = tftpy.TftpClient("127.0.0.1", running.addr[1],
                              options={"blksize": 1468, "tsize": 0})
    out = io.BytesIO()
    client.download("multi.bin", out, packethook=seen.append)
    assert hashlib.sha256(out.getvalue()).digest() == \
        hashlib.sha256((root / "multi.bin").read_bytes()).digest()
    wait_counter(running.engine, "transfers_completed", 1)
    c = running.engine.counters
    assert c["transfers_started"] == 1 and c["bytes_sent"] == 100_000
    assert c["transfers_failed"] == 0


def test_oack_reports_tsize_blksize_timeout(running: Running, root: Path) -> None:
    data, oack = fetch_raw(running.addr, "exact.bin",
                           {"blksize": "1024", "tsize": "0", "timeout": "2"})
    assert oack == {"blksize": "1024", "tsize": str(512 * 8), "timeout": "2"}
    assert data == (root / "exact.bin").read_bytes()


def test_plain_rrq_and_exact_multiple_and_empty(running: Running, root: Path) -> None:
    for name in ("exact.bin", "empty.bin", "multi.bin"):
        data, oack = fetch_raw(running.addr, name)
        assert oack == {}
        assert data == (root / name).read_bytes()
    wait_counter(running.engine, "transfers_completed", 3)


def test_netascii_mode(running: Running, root: Path) -> None:
    (root / "text.txt").write_bytes(b"line1\nline2\r\n")
    data, _ = fetch_raw(running.addr, "text.txt", mode="netascii")
    assert data == b"line1\r\nline2\r\0\r\n"


def test_refusals(running: Running) -> None:
    s = client_socket()
    for name, code in (("../secret", 2), ("/etc/passwd", 2), ("nope", 1)):
        s.sendto(rrq_bytes(name), running.addr)
        err = factory.parse(s.recvfrom(1000)[0])
        assert isinstance(err, TftpPacketERR) and err.errorcode == code, name
    wrq = TftpPacketWRQ()
    wrq.filename, wrq.mode, wrq.options = "upload.bin", "octet", {}
    s.sendto(wrq.encode().buffer, running.addr)
    err = factory.parse(s.recvfrom(1000)[0])
    assert err.errorcode == 2 and b"read-only" in err.errmsg
    s.sendto(rrq_bytes("multi.bin", mode="mail"), running.addr)
    assert factory.parse(s.recvfrom(1000)[0]).errorcode == 4
    c = running.engine.counters
    assert (c["refused_paths"], c["not_found"], c["refused_writes"], c["bad_requests"]) == \
        (2, 1, 1, 1)
    assert c["transfers_started"] == 0


def test_garbage_dropped_counted_and_server_keeps_serving(running: Running, root: Path) -> None:
    s = client_socket()
    garbage = [
        b"", b"\x00", b"\x00\x01", b"\x00\x01a",            # truncated
        b"\x00\x01" + b"A" * 600 + b"\x00octet\x00",        # oversized request
        os.urandom(3000),                                   # oversized garbage
        b"\x00\x09hello\x00octet\x00",                      # unknown opcode
        b"\x00\x04\x00\x01",                                # ACK on the request port
        b"\x00\x01name-without-nul",                        # no terminator
        b"\x00\x01only-name\x00",                           # no mode
        b"\x00\x01\xff\xfe\x00octet\x00",                   # not ASCII
        b"\x00\x01f\x00octet\x00blksize\x00",               # odd option list
        b"\x00\x01f\x00octet\x00\x00\x00",                  # empty option name
    ]
    for g in garbage:
        s.sendto(g, running.addr)
    wait_counter(running.engine, "malformed_dropped", len(garbage))
    assert running.engine.counters["malformed_dropped"] == len(garbage)
    assert fetch_raw(running.addr, "multi.bin")[0] == (root / "multi.bin").read_bytes()
    # Garbage on a transfer's own port is dropped too, and the transfer continues
    c = client_socket()
    c.sendto(rrq_bytes("exact.bin"), running.addr)
    pkt, tid = c.recvfrom(1000)
    c.sendto(b"\x00", tid)
    c.sendto(b"\x00\x07zz", tid)
    c.sendto(struct.pack("!HH", 4, 1), tid)
    pkt, _ = c.recvfrom(1000)
    assert factory.parse(pkt).blocknumber == 2
    wait_counter(running.engine, "malformed_dropped", len(garbage) + 2)


def test_retransmits_then_gives_up(running: Running) -> None:
    s = client_socket()
    s.sendto(rrq_bytes("multi.bin"), running.addr)
    first, _ = s.recvfrom(1000)
    again, _ = s.recvfrom(1000)         # no ACK from us: the same block comes back
    assert again == first and factory.parse(again).blocknumber == 1
    wait_counter(running.engine, "transfers_failed", 1, timeout=5)
    assert running.engine.counters["retransmits"] == 2


def test_duplicate_rrq_does_not_start_a_second_transfer(running: Running) -> None:
    s = client_socket()
    s.sendto(rrq_bytes("multi.bin"), running.addr)
    s.sendto(rrq_bytes("multi.bin"), running.addr)
    pkt, tid = s.recvfrom(1000)
    s.sendto(struct.pack("!HH", 5, 0) + b"stop\x00", tid)    # client aborts
    wait_counter(running.engine, "transfers_aborted_by_client", 1)
    assert running.engine.counters["transfers_started"] == 1
    assert running.engine.counters["transfers_failed"] == 0


def test_tsize_probe_is_counted_apart_and_not_a_warning(
        running: Running, caplog: pytest.LogCaptureFixture) -> None:
    """OVMF asks for tsize, reads the OACK and aborts with ERROR 8: normal, not a failure."""
    caplog.set_level("DEBUG", logger="appliance.tftp")
    s = client_socket()
    s.sendto(rrq_bytes("multi.bin", {"tsize": "0", "blksize": "1468"}), running.addr)
    pkt, tid = s.recvfrom(1000)
    oack = factory.parse(pkt)
    assert isinstance(oack, TftpPacketOACK) and oack.options["tsize"] == "100000"
    s.sendto(struct.pack("!HH", 5, 8) + b"User aborted the transfer\x00", tid)
    wait_counter(running.engine, "tsize_probes", 1)
    c = running.engine.counters
    assert c["transfers_failed"] == 0 and c["transfers_aborted_by_client"] == 0
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert any("size probe of multi.bin" in r.getMessage() for r in caplog.records)
    # ... and then the real download works.
    data, _ = fetch_raw(running.addr, "multi.bin", {"tsize": "0", "blksize": "1468"})
    assert data == (Path(running.engine.cfg.root) / "multi.bin").read_bytes()
    wait_counter(running.engine, "transfers_completed", 1)


def test_abort_mid_transfer_is_aborted_by_client(running: Running) -> None:
    s = client_socket()
    s.sendto(rrq_bytes("multi.bin", {"tsize": "0"}), running.addr)
    _, tid = s.recvfrom(1000)                                  # OACK
    s.sendto(struct.pack("!HH", 4, 0), tid)
    pkt, _ = s.recvfrom(1000)
    assert factory.parse(pkt).blocknumber == 1
    s.sendto(struct.pack("!HH", 5, 0) + b"disk full\x00", tid)
    wait_counter(running.engine, "transfers_aborted_by_client", 1)
    assert running.engine.counters["tsize_probes"] == 0
    assert running.engine.counters["transfers_failed"] == 0


def test_retransmit_timer_restarts_on_progress(running: Running) -> None:
    """The timer follows the transfer: after ACKs, the block now awaited is the one resent,
    and the retry count starts again from zero."""
    s = client_socket()
    s.sendto(rrq_bytes("multi.bin"), running.addr)
    pkt, tid = s.recvfrom(1000)
    assert factory.parse(pkt).blocknumber == 1
    again, _ = s.recvfrom(1000)                # block 1 again after ~0.3 s: 1 retransmit
    assert again == pkt
    t0 = time.monotonic()
    s.sendto(struct.pack("!HH", 4, 1), tid)
    b2, _ = s.recvfrom(1000)
    assert factory.parse(b2).blocknumber == 2
    s.sendto(struct.pack("!HH", 4, 2) + b"pad", tid)          # trailing bytes: still an ACK
    b3, _ = s.recvfrom(1000)
    assert factory.parse(b3).blocknumber == 3
    t1 = time.monotonic()
    s.sendto(struct.pack("!HH", 4, 2), tid)                   # duplicate ACK: ignored
    again, _ = s.recvfrom(1000)
    waited = time.monotonic() - t1
    assert again == b3 and 0.25 <= waited <= 0.3 + 0.2, waited
    # retries=2: block 3 goes out twice more, then the transfer times out.
    again, _ = s.recvfrom(1000)
    assert again == b3
    wait_counter(running.engine, "transfers_failed", 1, timeout=5)
    assert running.engine.counters["retransmits"] == 3
    assert time.monotonic() - t0 < 3


@pytest.mark.parametrize("workers", [1, 2])
def test_run_publishes_counters_and_stops(root: Path, tmp_path: Path, workers: int) -> None:
    db = Database(f"sqlite:///{tmp_path / 'state' / 'appliance.db'}")
    db.migrate()
    port = free_port()
    config = Config(state_dir=str(tmp_path / "state"))
    config.tftp = TftpConfig(bind="127.0.0.1", port=port, root=str(root), workers=workers)
    stop = threading.Event()
    t = threading.Thread(target=server.run, args=(config, db, stop))
    t.start()
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                data, _ = fetch_raw(("127.0.0.1", port), "multi.bin", {"blksize": "1468"})
                break
            except (TimeoutError, OSError):
                if time.monotonic() > deadline:
                    raise
        assert data == (root / "multi.bin").read_bytes()
        s = client_socket()
        s.sendto(rrq_bytes("../secret"), ("127.0.0.1", port))
        assert factory.parse(s.recvfrom(1000)[0]).errorcode == 2
        s.sendto(b"\x00\x01", ("127.0.0.1", port))
        time.sleep(1.5)                 # workers report their counters about every second
    finally:
        stop.set()
        t.join(20)
    assert not t.is_alive()
    tftp = read_counters(db)["tftp"]
    assert tftp["transfers_completed"] >= 1
    assert tftp["refused_paths"] == 1
    assert tftp["malformed_dropped"] == 1
    assert tftp["bytes_sent"] >= 100_000
    db.dispose()
