"""Password hashing for appliance users: argon2id (argon2-cffi's defaults, RFC 9106's
low-memory profile), checked in constant time by the library."""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

#: Shorter passwords are refused: the appliance powers machines off and wipes disks.
MIN_LENGTH = 10
MAX_LENGTH = 1024

_hasher = PasswordHasher()
#: Verified against when the user does not exist, so a wrong name costs the same time as
#: a wrong password and does not reveal which names exist.
_DUMMY_HASH = _hasher.hash("not a password of anyone")


class PasswordError(ValueError):
    """A password the policy refuses (the message says why)."""


def check_policy(password: str) -> None:
    if len(password) < MIN_LENGTH:
        raise PasswordError(f"password: at least {MIN_LENGTH} characters, got {len(password)}")
    if len(password) > MAX_LENGTH:
        raise PasswordError(f"password: at most {MAX_LENGTH} characters")
    if password.strip() != password:
        raise PasswordError("password: no leading or trailing white space (a pasted "
                            "newline is the usual cause)")


def hash_password(password: str) -> str:
    check_policy(password)
    return _hasher.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    """True when ``password`` matches; False for a mismatch, a damaged hash or no user
    (``stored_hash`` None, checked against a dummy hash to take the same time)."""
    try:
        return _hasher.verify(stored_hash or _DUMMY_HASH, password) and stored_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(stored_hash: str) -> bool:
    """The hash was made with weaker parameters than today's defaults."""
    try:
        return _hasher.check_needs_rehash(stored_hash)
    except InvalidHashError:
        return True
