"""A small HTTP client of ``/api/v1``: one endpoint, one token, TLS verified by default.

Every failure (refused connection, unknown host, timeout, TLS, an HTTP error with the
server's JSON message) becomes one :class:`RemoteError` naming the endpoint. It never
retries elsewhere and never falls back to anything local.
"""

from __future__ import annotations

import json
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

DEFAULT_TIMEOUT = 30.0


class RemoteError(Exception):
    """A call that failed; the message is the one line to show."""


def api_base(endpoint: str) -> str:
    """``https://box:8080`` or ``https://box:8080/api/v1`` → the ``/api/v1`` base URL."""
    parsed = urllib.parse.urlsplit(endpoint.strip())
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise RemoteError(f"endpoint: expected http://HOST[:PORT] or https://HOST[:PORT], "
                          f"got {endpoint!r}")
    path = parsed.path.rstrip("/")
    if not path.endswith("/api/v1"):
        path += "/api/v1"
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, path, "", ""))


@dataclass(frozen=True)
class Client:
    endpoint: str
    token: str
    ca_file: str | None = None
    timeout: float = DEFAULT_TIMEOUT

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             query: dict[str, Any] | None = None) -> Any:
        """The decoded JSON answer of ``METHOD /api/v1/PATH``; :class:`RemoteError` on any
        failure."""
        url = api_base(self.endpoint) + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items()
                                                 if v not in (None, "")})
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Accept": "application/json",
            **({"Content-Type": "application/json"} if data is not None else {})})
        context = ssl.create_default_context(cafile=self.ca_file) \
            if url.startswith("https:") else None
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=context) as resp:
                return _decode(resp.read(), url)
        except urllib.error.HTTPError as exc:
            raise RemoteError(f"{self.endpoint}: {exc.code} {_message(exc)}") from None
        except urllib.error.URLError as exc:
            raise RemoteError(f"cannot reach {self.endpoint}: {_reason(exc.reason)}") from None
        except TimeoutError:
            raise RemoteError(f"{self.endpoint}: no answer within {self.timeout:g} s") \
                from None
        except (ConnectionError, OSError) as exc:
            raise RemoteError(f"cannot reach {self.endpoint}: {_reason(exc)}") from None


def _reason(reason: Any) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, socket.gaierror):
        return f"unknown host ({reason.strerror or reason})"
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, ssl.SSLError):
        return f"TLS: {getattr(reason, 'reason', None) or reason} (see --ca-file)"
    return str(getattr(reason, "strerror", None) or reason)


def _message(exc: urllib.error.HTTPError) -> str:
    try:
        answer = json.loads(exc.read() or b"{}")
    except ValueError:
        answer = None
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        return answer["error"]
    return str(exc.reason)


def _decode(raw: bytes, url: str) -> Any:
    try:
        return json.loads(raw or b"null")
    except ValueError:
        raise RemoteError(f"{url}: the answer is not JSON (is this the appliance?)") \
            from None
