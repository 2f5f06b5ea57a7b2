"""IMDSv2 session tokens of the metadata service: stateless, HMAC-signed.

gunicorn runs several workers and none shares memory with the others, so a token is not
remembered anywhere: it carries its own claims (expiry, machine id, the client address
it was issued to, the deployment's instance id) and an HMAC-SHA256 over them with a key
derived from the appliance's key file (``secretbox.derived_key``, label
:data:`KEY_LABEL`). A token is worth nothing after its expiry, from another address, for
another machine or after a redeployment (new instance id); the caller checks the last
two against the machine it identified.

Format: ``v1.<base64url claims>.<base64url signature>``; the claims are
``<expiry ms>|<machine id>|<address>|<instance id>``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

VERSION = "v1"
KEY_LABEL = b"imds-token-v1"
#: Longest token looked at (a real one is about 110 characters).
MAX_TOKEN = 512
_INSTANCE_ID = re.compile(r"[A-Za-z0-9-]{1,32}")
_ADDRESS = re.compile(r"[0-9A-Fa-f.:]{1,45}")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")

#: Seconds since the epoch; tests replace it to expire tokens without sleeping.
now: Callable[[], float] = time.time


@dataclass(frozen=True)
class Claims:
    expires_ms: int
    machine_id: int
    address: str
    instance_id: str

    def ttl(self, at: float) -> int:
        """Whole seconds left at ``at`` (seconds since the epoch)."""
        return max(0, int((self.expires_ms - at * 1000) // 1000))


class TokenRefused(ValueError):
    """The token is not accepted; ``suspicious``: forged or used from elsewhere (worth an
    event), as opposed to merely malformed or expired."""

    def __init__(self, reason: str, suspicious: bool = False,
                 claims: Claims | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.suspicious = suspicious
        #: The genuine claims of a token used from another address.
        self.claims = claims


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(key: bytes, body: str) -> bytes:
    return hmac.new(key, f"{VERSION}.{body}".encode("ascii"), hashlib.sha256).digest()


def issue(key: bytes, *, machine_id: int, address: str, instance_id: str, ttl: int,
          at: float | None = None) -> str:
    """A token for ``ttl`` seconds from ``at`` (default: now)."""
    start = now() if at is None else at
    expires_ms = int((start + ttl) * 1000)
    body = _b64(f"{expires_ms}|{machine_id}|{address}|{instance_id}".encode("ascii"))
    return f"{VERSION}.{body}.{_b64(_sign(key, body))}"


def verify(key: bytes, token: str, *, address: str, at: float | None = None) -> Claims:
    """The token's claims, if it is genuine, unexpired and issued to ``address``; else
    :class:`TokenRefused` with a short reason."""
    parts = token.split(".") if len(token) <= MAX_TOKEN else []
    if (len(parts) != 3 or parts[0] != VERSION
            or not all(_BASE64URL.fullmatch(part) for part in parts[1:])):
        raise TokenRefused("malformed token")
    _, body, signature = parts
    try:
        given = _unb64(signature)
        fields = _unb64(body).decode("ascii").split("|")
    except (binascii.Error, ValueError):
        raise TokenRefused("malformed token") from None
    if not hmac.compare_digest(given, _sign(key, body)):
        raise TokenRefused("bad token signature", suspicious=True)
    # Signed by us, so well formed unless the format changed: checked anyway.
    if (len(fields) != 4 or not fields[0].isdigit() or not fields[1].isdigit()
            or not _ADDRESS.fullmatch(fields[2]) or not _INSTANCE_ID.fullmatch(fields[3])):
        raise TokenRefused("malformed token")
    claims = Claims(int(fields[0]), int(fields[1]), fields[2], fields[3])
    if claims.expires_ms <= (now() if at is None else at) * 1000:
        raise TokenRefused("token expired")
    if claims.address != address:
        raise TokenRefused("token issued to another address", suspicious=True, claims=claims)
    return claims
