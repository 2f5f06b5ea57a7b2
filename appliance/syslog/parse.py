"""Syslog messages as installers send them: RFC 3164, RFC 5424 and bare ``<PRI>msg``.

What arrives in practice:

- debian-installer: busybox ``syslogd -R host:port`` forwards each line exactly as the
  local program handed it to ``/dev/log`` (glibc's format, no hostname), newline
  terminated: ``<13>Apr  3 10:00:00 main-menu[245]: INFO: Menu item 'netcfg' selected``.
- anaconda (rsyslog, ``*.* @@host:port``, TCP) and util-linux ``logger --rfc3164``:
  ``<30>Apr  3 10:00:00 localhost anaconda[1234]: message`` (with a hostname).
- rsyslog's ``RSYSLOG_ForwardFormat``: an RFC 3339 timestamp instead of ``Mmm dd``.
- RFC 5424 (``logger --rfc5424``, rsyslog ``RSYSLOG_SyslogProtocol23Format``):
  ``<13>1 2024-04-03T10:00:00.1+02:00 host app 1234 ID47 [sd id="1"] message``.

A message without a valid ``<PRI>`` (0-191) is malformed; so is an empty one or one over
``MAX_MESSAGE_BYTES``. Anything after a valid PRI is accepted: text that cannot be
recognised as timestamp, host or tag stays in the message, never dropped. Bytes that
are not UTF-8 are replaced (U+FFFD).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from appliance.installlogs import LogLine

#: Largest message accepted (a datagram, or a TCP frame); larger ones are malformed.
MAX_MESSAGE_BYTES = 8192

MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}

_PRI = re.compile(rb"<(\d{1,3})>")
_BSD_TIME = re.compile(
    r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) {1,2}(\d{1,2}) "
    r"(\d\d):(\d\d):(\d\d)(?:\.\d{1,6})? ")
_ISO_TIME = re.compile(
    r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)) ")
#: ``prog:``, ``prog[pid]:``; d-i tags look like ``main-menu``, ``net/hw-detect.hotplug``.
_TAG = re.compile(r"([^\s\[\]:]{1,128})(?:\[([^\]\s]{0,32})\])?:(?: |$)")


class Malformed(ValueError):
    """Not a syslog message; ``reason`` is ``empty``, ``oversized`` or ``no_pri``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SyslogMessage:
    facility: int
    severity: int
    #: The sender's timestamp in UTC (naive), or None when absent or not a valid time.
    #: RFC 3164 stamps carry no zone or year: taken as UTC, year from ``now``.
    timestamp: dt.datetime | None
    hostname: str
    program: str
    pid: str
    message: str
    #: ``rfc5424``, ``rfc3164`` or ``bare``.
    format: str

    def log_line(self, at: dt.datetime | None = None) -> LogLine:
        return LogLine(severity=self.severity, program=self.program, message=self.message,
                       at=at)


def parse(data: bytes, now: dt.datetime | None = None) -> SyslogMessage:
    """Parse one message (a datagram, a TCP frame). Raises ``Malformed``."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise Malformed("oversized")
    data = data.rstrip(b"\r\n\x00")
    if not data.strip():
        raise Malformed("empty")
    m = _PRI.match(data)
    if m is None or int(m.group(1)) > 191:
        raise Malformed("no_pri")
    pri = int(m.group(1))
    text = data[m.end():].decode("utf-8", errors="replace")
    now = now or dt.datetime.now(dt.UTC).replace(tzinfo=None)
    msg = _parse_5424(pri, text) if text[:2] == "1 " else None
    return msg or _parse_3164(pri, text, now)


def _utc(value: str) -> dt.datetime | None:
    try:
        stamp = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    if stamp.tzinfo is not None:
        stamp = stamp.astimezone(dt.UTC).replace(tzinfo=None)
    return stamp


def _nil(value: str) -> str:
    return "" if value == "-" else value


def _skip_structured_data(text: str) -> int | None:
    """Length of the STRUCTURED-DATA at the start of ``text`` (``-`` or ``[..]...``)."""
    if text.startswith("-"):
        return 1
    i = 0
    while i < len(text) and text[i] == "[":
        i += 1
        in_quotes = False
        while i < len(text):
            c = text[i]
            if in_quotes and c == "\\":
                i += 2
                continue
            if c == '"':
                in_quotes = not in_quotes
            elif c == "]" and not in_quotes:
                break
            i += 1
        else:
            return None                               # unterminated element
        i += 1
    return i or None


def _parse_5424(pri: int, text: str) -> SyslogMessage | None:
    """``1 TIMESTAMP HOST APP PROCID MSGID SD [MSG]``; None if it is not that shape."""
    parts = text.split(" ", 6)
    if len(parts) < 7:
        return None
    _version, stamp, host, app, procid, _msgid, rest = parts
    sd_len = _skip_structured_data(rest)
    if sd_len is None or (sd_len < len(rest) and rest[sd_len] != " "):
        return None
    message = rest[sd_len + 1:]
    if message.startswith("\ufeff"):                  # the BOM RFC 5424 allows
        message = message[1:]
    return SyslogMessage(
        facility=pri >> 3, severity=pri & 7,
        timestamp=None if stamp == "-" else _utc(stamp),
        hostname=_nil(host), program=_nil(app), pid=_nil(procid), message=message,
        format="rfc5424",
    )


def _bsd_timestamp(m: re.Match[str], now: dt.datetime) -> dt.datetime | None:
    """``Mmm dd hh:mm:ss`` in this year, or last year if that is over a month ahead
    (December's lines read in January), or next year if nearly a year behind."""
    month, day = MONTHS[m.group(1)], int(m.group(2))
    hour, minute, second = int(m.group(3)), int(m.group(4)), int(m.group(5))
    try:
        stamp = dt.datetime(now.year, month, day, hour, minute, second)
        if stamp - now > dt.timedelta(days=31):
            stamp = stamp.replace(year=now.year - 1)
        elif now - stamp > dt.timedelta(days=334):
            stamp = stamp.replace(year=now.year + 1)
    except ValueError:                                # 31 Feb, 29 Feb in another year
        return None
    return stamp


def _parse_3164(pri: int, text: str, now: dt.datetime) -> SyslogMessage:
    """``TIMESTAMP [HOST] TAG: MSG``, or anything after a PRI (``bare``)."""
    stamp = None
    fmt = "bare"
    m = _BSD_TIME.match(text)
    if m:
        stamp, fmt = _bsd_timestamp(m, now), "rfc3164"
    else:
        m = _ISO_TIME.match(text)
        if m:
            stamp, fmt = _utc(m.group(1)), "rfc3164"
    host = ""
    rest = text[m.end():] if m else text
    tag = _TAG.match(rest)
    if tag is None and m is not None:
        # After a timestamp: "HOST TAG: MSG" (rsyslog, logger) rather than busybox's
        # "TAG: MSG". A first word not followed by a tag is message text, not a host.
        word, _, after = rest.partition(" ")
        tag = _TAG.match(after)
        if tag is not None and word:
            host, rest = word, after
    program = pid = ""
    if tag is not None:
        program, pid = tag.group(1), tag.group(2) or ""
        rest = rest[tag.end():]
    return SyslogMessage(
        facility=pri >> 3, severity=pri & 7, timestamp=stamp, hostname=host,
        program=program, pid=pid, message=rest, format=fmt,
    )


class StreamFramer:
    """Splits a TCP syslog stream into messages (RFC 6587): octet counting
    (``LEN SP MSG``, what rsyslog sends with ``TCP_Framing="octet-counted"`` and
    ``logger --octet-count``) or newline-terminated (rsyslog's default, anaconda).

    ``feed`` returns complete frames, and ``None`` in place of each frame that was too
    large (its bytes are skipped, the stream stays in step).
    """

    def __init__(self, max_frame: int = MAX_MESSAGE_BYTES) -> None:
        self.max_frame = max_frame
        self.buf = bytearray()
        self.skip = 0                 # bytes of an oversized octet-counted frame to skip
        self.discarding = False       # inside an oversized newline-terminated frame

    def feed(self, data: bytes) -> list[bytes | None]:
        self.buf += data
        out: list[bytes | None] = []
        while self.buf:
            if self.skip:
                n = min(self.skip, len(self.buf))
                del self.buf[:n]
                self.skip -= n
                continue
            if self.discarding:
                nl = self.buf.find(b"\n")
                if nl < 0:
                    self.buf.clear()
                    break
                del self.buf[:nl + 1]
                self.discarding = False
                continue
            if self.buf[:1].isdigit():
                sp = self.buf.find(b" ", 0, 12)
                head = bytes(self.buf[:sp]) if sp > 0 else b""
                if sp < 0 and len(self.buf) < 12 and bytes(self.buf).isdigit():
                    break                     # the length is still arriving
                if not head.isdigit():
                    out.append(None)          # digits that are no length: resync at LF
                    self.discarding = True
                    continue
                length = int(head)
                if length > self.max_frame:
                    out.append(None)
                    del self.buf[:sp + 1]
                    self.skip = length
                    continue
                if len(self.buf) < sp + 1 + length:
                    break                     # the frame is still arriving
                out.append(bytes(self.buf[sp + 1:sp + 1 + length]))
                del self.buf[:sp + 1 + length]
                continue
            nl = self.buf.find(b"\n")
            if nl < 0:
                if len(self.buf) > self.max_frame:
                    out.append(None)
                    self.buf.clear()
                    self.discarding = True
                break
            frame = bytes(self.buf[:nl])
            del self.buf[:nl + 1]
            if len(frame) > self.max_frame:
                out.append(None)
            elif frame.strip(b"\r\x00 "):
                out.append(frame)
        return out
