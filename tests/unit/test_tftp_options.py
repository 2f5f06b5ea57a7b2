"""Option negotiation (RFC 2347/2348/2349) and datagram building, checked with tftpy's
own packet classes."""

from __future__ import annotations

import pytest
from tftpy.TftpPacketFactory import TftpPacketFactory
from tftpy.TftpPacketTypes import TftpPacketERR, TftpPacketOACK, TftpPacketRRQ

from appliance.tftp.engine import error_packet
from appliance.tftp.files import LazyDatagrams, build_datagrams, to_netascii
from appliance.tftp.options import MAX_BLKSIZE, encode_oack, negotiate

factory = TftpPacketFactory()


def rrq(filename: str, options: dict[str, str], mode: str = "octet") -> TftpPacketRRQ:
    """An RRQ as a client would send it, encoded by tftpy and parsed back by tftpy."""
    pkt = TftpPacketRRQ()
    pkt.filename = filename
    pkt.mode = mode
    pkt.options = options
    return factory.parse(pkt.encode().buffer)


def test_blksize_and_tsize_accepted_and_echoed_in_oack() -> None:
    req = rrq("undionly.kpxe", {"blksize": "1468", "tsize": "0"})
    neg = negotiate(req.options, 74213)
    assert neg.blksize == 1468
    assert neg.accepted == {"blksize": "1468", "tsize": "74213"}
    oack = factory.parse(encode_oack(neg.accepted))
    assert isinstance(oack, TftpPacketOACK)
    assert oack.options == {"blksize": "1468", "tsize": "74213"}


def test_blksize_capped_at_server_maximum() -> None:
    assert negotiate({"blksize": "65535"}, 10).blksize == MAX_BLKSIZE
    neg = negotiate({"blksize": "9000"}, 10, max_blksize=1468)
    assert neg.blksize == 1468 and neg.accepted["blksize"] == "1468"


@pytest.mark.parametrize("value", ["7", "0", "-1", "abc", "", "1e3", "99999999999999999"])
def test_invalid_blksize_is_left_out(value: str) -> None:
    neg = negotiate({"blksize": value}, 10)
    assert neg.blksize == 512 and neg.accepted == {}


def test_timeout_option() -> None:
    neg = negotiate({"timeout": "3"}, 10)
    assert neg.timeout == 3.0 and neg.accepted == {"timeout": "3"}
    for bad in ("0", "256", "x"):
        neg = negotiate({"timeout": bad}, 10)
        assert neg.timeout is None and neg.accepted == {}


def test_unknown_options_ignored_and_names_case_insensitive() -> None:
    neg = negotiate({"BLKSIZE": "1024", "windowsize": "8", "multicast": ""}, 5000)
    assert neg.blksize == 1024
    assert neg.accepted == {"blksize": "1024"}


def test_error_packet_decodes_with_tftpy() -> None:
    err = factory.parse(error_packet(2, "Server is read-only"))
    assert isinstance(err, TftpPacketERR)
    assert err.errorcode == 2 and err.errmsg == b"Server is read-only"
    assert factory.parse(error_packet(1)).errorcode == 1


@pytest.mark.parametrize("size,blksize,blocks", [
    (0, 512, 1), (1, 512, 1), (511, 512, 1), (512, 512, 2), (1024, 512, 3),
    (1468 * 3, 1468, 4), (1468 * 3 + 5, 1468, 4),
])
def test_datagrams_end_with_a_short_block(size: int, blksize: int, blocks: int) -> None:
    data = bytes(range(256)) * (size // 256 + 1)
    data = data[:size]
    packets = build_datagrams(memoryview(data), blksize)
    assert len(packets) == blocks
    assert len(packets[-1]) - 4 < blksize
    got = b""
    for i, p in enumerate(packets, start=1):
        dat = factory.parse(p)
        assert dat.blocknumber == i & 0xFFFF
        got += dat.data
    assert got == data
    assert list(LazyDatagrams(memoryview(data), blksize)) == packets


def test_block_numbers_wrap_after_65535() -> None:
    packets = build_datagrams(memoryview(b"x" * (8 * 65537)), 8)
    assert factory.parse(packets[65534]).blocknumber == 65535
    assert factory.parse(packets[65535]).blocknumber == 0
    assert factory.parse(packets[65536]).blocknumber == 1


def test_netascii_translation() -> None:
    assert to_netascii(b"a\nb\rc\r\n") == b"a\r\nb\r\0c\r\0\r\n"
