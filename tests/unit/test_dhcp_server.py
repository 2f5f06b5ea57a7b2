"""The packet loop's scheduling without a network: chunking, REQUESTs before DISCOVERs,
commit before ACK, stale packets dropped; and the kernel-side DISCOVER split of the
transport on loopback."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from appliance.config import Config
from appliance.db import Database
from appliance.dhcp import server as server_mod
from appliance.dhcp.codec import decode, encode, ip_to_int
from appliance.dhcp.leases import SubnetInfo
from appliance.dhcp.options import ACK, DISCOVER, OFFER, REQUEST
from appliance.dhcp.packets import Incoming, Outgoing
from appliance.dhcp.server import CHUNK, MAX_REQUEST_CHUNKS, DhcpServer
from appliance.dhcp.transport import Transport

LOCAL = ip_to_int("10.250.50.1")
RELAY = ip_to_int("10.250.50.2")


def payload(i: int, mt: int, extra: bytes = b"") -> bytes:
    mac = (0x020000000000 + i).to_bytes(6, "big") + b"\x00" * 10
    return encode(op=1, xid=i, flags=0, ciaddr=0, yiaddr=0, siaddr=0, giaddr=RELAY,
                  chaddr=mac, hops=1, options=bytes((53, 1, mt)) + extra)


def incoming(data: bytes, rx_time: float = 0.0) -> Incoming:
    return Incoming(data, RELAY, 67, 2, LOCAL, 67, rx_time)


class FakeTransport:
    """Queued datagrams per socket; records sends in ``events``."""

    def __init__(self, events: list[tuple[str, int]]) -> None:
        self.events = events
        self.queues: dict[str, list[Incoming]] = {"main": [], "discover": []}
        self.reads: list[tuple[str, int]] = []

    def receivers(self) -> list[tuple[str, int, bool]]:
        return [("main", 67, False), ("discover", 67, True)]

    def read(self, sock: str, port: int, out: list[Incoming], limit: int) -> int:
        q = self.queues[sock]
        taken, self.queues[sock] = q[:limit], q[limit:]
        out.extend(taken)
        self.reads.append((sock, len(taken)))
        self.events.append(("read", len(taken)))
        return len(taken)

    def send(self, out: Outgoing) -> None:
        self.events.append(("send", decode(out.payload, require_request=False).msg_type))


@pytest.fixture
def srv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    cfg = Config()
    cfg.state_dir = str(tmp_path)
    s = DhcpServer(cfg, Database(f"sqlite:///{tmp_path / 'a.db'}"))
    s.table.set_subnets([SubnetInfo(
        id=1, network=ip_to_int("10.250.0.0"), prefix=16, pool_start=ip_to_int("10.250.60.0"),
        pool_end=ip_to_int("10.250.255.254"), router=LOCAL, cidr="10.250.0.0/16")])
    events: list[tuple[str, int]] = []
    s.transport = FakeTransport(events)  # type: ignore[assignment]
    s.events = events  # type: ignore[attr-defined]
    s.commit_ok = True  # type: ignore[attr-defined]

    def commit(now: float) -> bool:
        rows = s.table.take_dirty()
        events.append(("commit", len(rows)))
        return s.commit_ok  # type: ignore[attr-defined,no-any-return]

    monkeypatch.setattr(s, "commit", commit)
    return s


def offers_to_requests(srv: DhcpServer, n: int) -> list[Incoming]:
    """DORA first half for clients 0..n-1: their REQUESTs for the offered addresses."""
    srv.answer([incoming(payload(i, DISCOVER)) for i in range(n)])
    reqs = []
    for i in range(n):
        e = srv.table.by_mac[((0x020000000000 + i).to_bytes(6, "big").hex(":"), 1)]
        reqs.append(incoming(payload(i, REQUEST, bytes((50, 4)) + e.ip.to_bytes(4, "big")
                                     + bytes((54, 4)) + LOCAL.to_bytes(4, "big"))))
    srv.events.clear()  # type: ignore[attr-defined]
    return reqs


def test_acks_only_after_their_commit_and_requests_before_discovers(srv) -> None:  # type: ignore[no-untyped-def]
    reqs = offers_to_requests(srv, 5)
    # A mixed chunk, DISCOVERs first in arrival order: the REQUESTs are answered first,
    # the OFFERs go out as they are made, the ACKs only after one commit of all five.
    srv.answer([incoming(payload(100 + i, DISCOVER)) for i in range(3)] + reqs)
    ev = srv.events
    assert ev == [("send", OFFER)] * 3 + [("commit", 5)] + [("send", ACK)] * 5
    assert srv.counters["acks"] == 5 and srv.counters["offers"] == 5 + 3


def test_failed_commit_sends_no_ack(srv) -> None:  # type: ignore[no-untyped-def]
    reqs = offers_to_requests(srv, 4)
    srv.commit_ok = False
    srv.answer(reqs)
    assert srv.events == [("commit", 4)]  # and no ACK


def test_stale_packets_are_not_answered(srv) -> None:  # type: ignore[no-untyped-def]
    now = time.time()
    old_discover = incoming(payload(1, DISCOVER), now - server_mod.DISCOVER_MAX_AGE - 1)
    fresh_discover = incoming(payload(2, DISCOVER), now)
    srv.answer([old_discover, fresh_discover])
    assert srv.events == [("send", OFFER)]
    assert srv.counters["dropped_stale"] == 1


def test_pump_answers_requests_in_chunks_then_one_chunk_of_discovers(srv) -> None:  # type: ignore[no-untyped-def]
    n = CHUNK * 2 + 5
    reqs = offers_to_requests(srv, n)
    t = srv.transport
    t.queues["main"] = list(reqs)
    t.queues["discover"] = [incoming(payload(1000 + i, DISCOVER)) for i in range(CHUNK * 3)]
    more = srv.pump(t.receivers())
    # every REQUEST answered, CHUNK at a time, each chunk committed before its ACKs ...
    assert t.reads[:3] == [("main", CHUNK), ("main", CHUNK), ("main", 5)]
    kinds = [e for e in srv.events if e[0] == "commit" or e == ("send", ACK)]
    assert kinds == ([("commit", CHUNK)] + [("send", ACK)] * CHUNK) * 2 + \
        [("commit", 5)] + [("send", ACK)] * 5
    # ... then one chunk of DISCOVERs, the rest left in the socket for the next round
    assert t.reads[3:] == [("discover", CHUNK)]
    assert srv.events[-CHUNK:] == [("send", OFFER)] * CHUNK
    assert len(t.queues["discover"]) == CHUNK * 2 and more
    # at most one chunk of replies per read: no bursts of thousands
    run = longest = 0
    for e in srv.events:
        run = run + 1 if e[0] == "send" else 0
        longest = max(longest, run)
    assert longest <= CHUNK


def test_pump_does_not_starve_discovers(srv) -> None:  # type: ignore[no-untyped-def]
    t = srv.transport
    t.queues["main"] = [incoming(b"garbage")] * (CHUNK * (MAX_REQUEST_CHUNKS + 3))
    t.queues["discover"] = [incoming(payload(1, DISCOVER))]
    srv.pump(t.receivers())
    assert [r for r in t.reads if r[0] == "main"] == [("main", CHUNK)] * MAX_REQUEST_CHUNKS
    assert ("send", OFFER) in srv.events
    assert srv.counters["dropped_malformed"] == CHUNK * MAX_REQUEST_CHUNKS


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_housekeeping_slice_only_when_quiet() -> None:
    """A quiet slice only after poll() waited and nothing came; an empty poll(0) right
    after a full chunk (packets still flowing) gets only the allowance."""
    budget = server_mod.housekeeping_budget
    assert budget(waited=True, events=False, allowance=0.0) == server_mod.QUIET_SLICE
    assert budget(waited=False, events=False, allowance=0.0) == 0.0
    assert budget(waited=False, events=False, allowance=0.004) == 0.004
    assert budget(waited=True, events=True, allowance=0.001) == 0.0
    assert budget(waited=False, events=True, allowance=0.01) == 0.01


def test_transport_splits_discovers_into_their_own_socket() -> None:
    port = _free_port()
    t = Transport("127.0.0.1", [port])
    try:
        if not t.discover_socks:
            pytest.skip("kernel without SO_ATTACH_REUSEPORT_CBPF / socket filters")
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sent = [payload(1, DISCOVER), payload(2, REQUEST), b"short garbage",
                payload(3, DISCOVER), payload(4, 8)]
        for data in sent:
            tx.sendto(data, ("127.0.0.1", port))
        tx.close()
        time.sleep(0.2)
        got: dict[bool, list[bytes]] = {False: [], True: []}
        for sock, p, only_discovers in t.receivers():
            out: list[Incoming] = []
            t.read(sock, p, out, 100)
            got[only_discovers] = [rx.data for rx in out]
        assert got[True] == [sent[0], sent[3]]
        assert got[False] == [sent[1], sent[2], sent[4]]  # garbage too: it gets counted
        assert t.kernel_drops() == 0
        # A flood of DISCOVERs overflows only the small DISCOVER socket; the kernel drops
        # the excess (counted) and a REQUEST sent after it still gets through.
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for i in range(3000):
            tx.sendto(payload(i, DISCOVER), ("127.0.0.1", port))
        tx.sendto(payload(7, REQUEST), ("127.0.0.1", port))
        tx.close()
        time.sleep(0.2)
        assert t.kernel_drops() > 0
        main: list[Incoming] = []
        t.read(t.socks[port], port, main, 100)
        assert [rx.data for rx in main] == [payload(7, REQUEST)]
    finally:
        t.close()


def test_dhcp_connections_checkpoint_less_often(tmp_path: Path) -> None:
    """The packet thread's lease writes and its housekeeping both run with the larger
    WAL checkpoint interval, and what the writer commits is in the database."""
    from sqlalchemy import text

    from appliance.dhcp.store import WAL_AUTOCHECKPOINT_PAGES, LeaseWriter, tune_connections
    from appliance.models import Subnet

    db = Database(f"sqlite:///{tmp_path / 'a.db'}")
    db.migrate()
    with db.session() as s:
        s.add(Subnet(id=1, network="10.250.0.0/16"))
    tune_connections(db)
    tune_connections(db)  # idempotent
    writer = LeaseWriter(db)
    now = time.time()
    writer.write([("10.250.60.1", "02:00:00:00:00:01", 1, "bound", None, None, now,
                   now + 3600, now)])
    assert writer._conn is not None
    cur = writer._conn.cursor()
    assert cur.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == WAL_AUTOCHECKPOINT_PAGES
    cur.close()
    db.engine.dispose()  # fresh pool connections: the listener sets them up too
    with db.session() as s:
        pages = s.execute(text("PRAGMA wal_autocheckpoint")).scalar()
        assert pages == WAL_AUTOCHECKPOINT_PAGES
        assert s.execute(text("SELECT mac FROM leases")).scalars().all() == [
            "02:00:00:00:00:01"]
    writer.close()
