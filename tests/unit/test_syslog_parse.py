"""Syslog parsing on what installers really send (captured from busybox syslogd -R,
util-linux logger and rsyslog), and on garbage."""

from __future__ import annotations

import datetime as dt
import os

import pytest

from appliance.syslog.parse import MAX_MESSAGE_BYTES, Malformed, StreamFramer, parse

NOW = dt.datetime(2026, 11, 22, 2, 30, 0)


# Captured from busybox 1.35 `syslogd -n -R host:port` forwarding `busybox logger`
# lines (as debian-installer's programs log): glibc's format, no hostname, newline.
@pytest.mark.parametrize("data, severity, facility, program, pid, message", [
    (b"<14>Nov 22 02:27:38 main-menu: INFO: Menu item netcfg selected\n",
     6, 1, "main-menu", "", "INFO: Menu item netcfg selected"),
    (b"<27>Nov 22 02:27:38 root: plain\n", 3, 3, "root", "", "plain"),
    (b"<13>Nov  3 09:05:01 main-menu[245]: INFO: Menu item 'netcfg' selected\n",
     5, 1, "main-menu", "245", "INFO: Menu item 'netcfg' selected"),
    (b"<13>Nov 22 02:28:00 net/hw-detect.hotplug: Detected hotpluggable network interface "
     b"ens3\n", 5, 1, "net/hw-detect.hotplug",
     "", "Detected hotpluggable network interface ens3"),
    (b"<6>Nov 22 02:28:00 kernel: [    1.234567] e1000: Intel(R) PRO/1000 Network Driver\n",
     6, 0, "kernel", "", "[    1.234567] e1000: Intel(R) PRO/1000 Network Driver"),
    (b"<11>Nov 22 02:28:00 in-target: E: Unable to locate package foo\n",
     3, 1, "in-target", "", "E: Unable to locate package foo"),
])
def test_busybox_syslogd_forwarded_lines(data, severity, facility, program, pid,
                                         message) -> None:  # type: ignore[no-untyped-def]
    m = parse(data, NOW)
    assert (m.severity, m.facility, m.program, m.pid, m.message) == (
        severity, facility, program, pid, message)
    assert m.hostname == ""
    assert m.format == "rfc3164"


def test_busybox_timestamp_has_no_year_and_no_zone() -> None:
    assert parse(b"<13>Nov  3 09:05:01 x: y\n", NOW).timestamp == dt.datetime(2026, 11, 3,
                                                                              9, 5, 1)
    # December's lines read in January belong to last year, not to next December.
    jan = dt.datetime(2027, 1, 2, 0, 0, 0)
    assert parse(b"<13>Dec 31 23:59:59 x: y", jan).timestamp == dt.datetime(2026, 12, 31,
                                                                            23, 59, 59)
    assert parse(b"<13>Feb 29 10:00:00 x: y", NOW).timestamp is None    # 2026: no 29 Feb
    assert parse(b"<13>Feb 29 10:00:00 x: y", NOW).message == "y"


def test_util_linux_logger_rfc3164_has_a_hostname() -> None:
    # logger -n ... -d --rfc3164 -t anaconda -i -p local1.warning "hello 3164"
    m = parse(b"<140>Nov 22 02:27:38 vm anaconda[13421]: hello 3164", NOW)
    assert (m.facility, m.severity) == (17, 4)
    assert (m.hostname, m.program, m.pid, m.message) == ("vm", "anaconda", "13421",
                                                         "hello 3164")


def test_rsyslog_traditional_forward_format() -> None:
    # anaconda's rsyslog, `*.* @@host:port`: RSYSLOG_TraditionalForwardFormat
    m = parse(b"<30>Nov 22 02:27:38 localhost-live anaconda[1723]: anaconda 39.32.6-2 for "
              b"Fedora 39 (pre-release) started.\n", NOW)
    assert (m.hostname, m.program, m.pid, m.severity) == ("localhost-live", "anaconda",
                                                          "1723", 6)
    assert m.message == "anaconda 39.32.6-2 for Fedora 39 (pre-release) started."


def test_rsyslog_forward_format_rfc3339_timestamp() -> None:
    m = parse(b"<86>2026-11-22T03:27:38.123+01:00 node7 sshd[99]: Accepted publickey", NOW)
    assert m.timestamp == dt.datetime(2026, 11, 22, 2, 27, 38, 123000)
    assert (m.hostname, m.program, m.pid, m.severity, m.facility) == ("node7", "sshd", "99",
                                                                      6, 10)
    assert m.message == "Accepted publickey"


def test_rfc5424_from_util_linux_logger() -> None:
    m = parse(b'<141>1 2026-11-22T02:27:38.683771+00:00 vm anaconda - - [timeQuality '
              b'tzKnown="1" isSynced="0"] hello 5424', NOW)
    assert m.format == "rfc5424"
    assert (m.facility, m.severity) == (17, 5)
    assert (m.hostname, m.program, m.pid, m.message) == ("vm", "anaconda", "", "hello 5424")
    assert m.timestamp == dt.datetime(2026, 11, 22, 2, 27, 38, 683771)


def test_rfc5424_examples_from_the_rfc() -> None:
    m = parse(b"<34>1 2003-10-11T22:14:15.003Z mymachine.example.com su - ID47 - "
              b"\xef\xbb\xbf'su root' failed for lonvick on /dev/pts/8", NOW)
    assert (m.facility, m.severity, m.program, m.hostname) == (4, 2, "su",
                                                               "mymachine.example.com")
    assert m.message == "'su root' failed for lonvick on /dev/pts/8"      # BOM removed
    m = parse(b"<165>1 2003-08-24T05:14:15.000003-07:00 192.0.2.1 myproc 8710 - - "
              b"%% It's time to make the do-nuts.", NOW)
    assert m.timestamp == dt.datetime(2003, 8, 24, 12, 14, 15, 3)
    assert (m.program, m.pid, m.message) == ("myproc", "8710",
                                             "%% It's time to make the do-nuts.")
    # Structured data with escaped quote and bracket, several elements, no message.
    m = parse(b'<165>1 2003-10-11T22:14:15.003Z host evntslog - ID47 [exampleSDID@32473 '
              b'iut="3" eventSource="App\\"lic\\]ation"][examplePriority@32473 class="high"]',
              NOW)
    assert (m.program, m.message) == ("evntslog", "")
    # All nil.
    m = parse(b"<13>1 - - - - - -", NOW)
    assert (m.timestamp, m.hostname, m.program, m.message) == (None, "", "", "")


def test_bare_pri_and_message() -> None:
    m = parse(b"<13>hello world", NOW)
    assert (m.format, m.severity, m.program, m.message, m.timestamp) == (
        "bare", 5, "", "hello world", None)
    m = parse(b"<11>anna[1234]: retrieving foo.udeb", NOW)
    assert (m.program, m.pid, m.message) == ("anna", "1234", "retrieving foo.udeb")


def test_text_that_is_not_host_or_tag_stays_in_the_message() -> None:
    m = parse(b"<13>Nov 22 02:27:38 just some words", NOW)
    assert (m.hostname, m.program, m.message) == ("", "", "just some words")
    m = parse(b"<13>1 not really 5424", NOW)          # too few fields: not RFC 5424
    assert m.format == "bare" and m.message == "1 not really 5424"


def test_invalid_utf8_is_replaced_not_rejected() -> None:
    m = parse(b"<13>Nov 22 02:27:38 prog: caf\xe9 \xff\xfe ok", NOW)
    assert m.program == "prog"
    assert m.message == "caf\ufffd \ufffd\ufffd ok"


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"\n", "empty"),
    (b"\x00\x00\r\n", "empty"),
    (b"no pri here", "no_pri"),
    (b"<>x", "no_pri"),
    (b"<1234>x", "no_pri"),
    (b"<192>x", "no_pri"),
    (b"<-1>x", "no_pri"),
    (b" <13>x", "no_pri"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "no_pri"),       # a TLS hello
    (b"<13>" + b"x" * MAX_MESSAGE_BYTES, "oversized"),
    (b"x" * (9 * 1024), "oversized"),
])
def test_malformed(data: bytes, reason: str) -> None:
    with pytest.raises(Malformed) as exc:
        parse(data, NOW)
    assert exc.value.reason == reason


def test_largest_message_is_accepted() -> None:
    data = b"<13>p: " + b"y" * (MAX_MESSAGE_BYTES - 7)
    assert len(parse(data, NOW).message) == MAX_MESSAGE_BYTES - 7


def test_random_bytes_never_raise_anything_but_malformed() -> None:
    for size in (1, 2, 5, 64, 1500, 9000):
        for _ in range(200):
            data = os.urandom(size)
            try:
                m = parse(data, NOW)
            except Malformed:
                continue
            assert data.startswith(b"<") and 0 <= m.severity <= 7
    for _ in range(500):
        data = b"<13>" + os.urandom(40)
        parse(data, NOW)                            # a valid PRI: always a message


def test_stream_framer_newline_and_octet_counting() -> None:
    f = StreamFramer()
    assert f.feed(b"<13>a: one\n<13>a: tw") == [b"<13>a: one"]
    assert f.feed(b"o\n\n") == [b"<13>a: two"]
    # logger -T --octet-count: "LEN SP MSG", arriving in pieces
    frame = b'<13>1 2026-11-22T02:27:38.690724+00:00 vm tcpprog - - - hello tcp'
    wire = str(len(frame)).encode() + b" " + frame
    assert f.feed(wire[:1]) == []
    assert f.feed(wire[1:10]) == []
    assert f.feed(wire[10:] + wire) == [frame, frame]
    assert f.buf == bytearray()


def test_stream_framer_skips_oversized_frames_and_stays_in_step() -> None:
    f = StreamFramer(max_frame=100)
    assert f.feed(b"500 " + b"x" * 200) == [None]
    assert f.feed(b"x" * 300 + b"5 <13>a") == [b"<13>a"]
    assert f.feed(b"y" * 150) == [None]                 # newline framing, no LF yet
    assert f.feed(b"y" * 50 + b"\n<13>b: ok\n") == [b"<13>b: ok"]
    assert f.feed(b"12345678901234567890\n<13>c\n") == [None, b"<13>c"]
