"""Secrets at rest (BMC passwords): Fernet (AES-128-CBC + HMAC-SHA256) with a key kept
in the state directory, outside the database. Keys for other purposes (the metadata
service's IMDSv2 session tokens) are derived from the same key file with a label each.

A copy of the database alone (a backup, a PostgreSQL server shared by several
appliances' operators) does not reveal the passwords; the key file does, so it is
created mode 0600 and owned like the state directory (the service user), also when
the first secret is stored by ``root`` running the CLI.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

KEY_FILE = "secret.key"
#: Prefix of every stored secret, so a future key or scheme change can be recognised.
PREFIX = "fernet1:"


class SecretError(ValueError):
    """A secret cannot be decrypted (wrong key file, damaged value)."""


def key_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / KEY_FILE


def _load_or_create_key(state_dir: str | Path) -> bytes:
    path = key_path(state_dir)
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise SecretError(f"cannot read the key file {path}: {exc.strerror}") from None
    if not path.parent.is_dir():
        raise SecretError(f"the state directory {path.parent} does not exist (run "
                          "`appliance db upgrade` or start the service first)")
    # Written under a temporary name and linked into place, so no process ever reads a
    # half-written key; the first link wins and everyone uses that key.
    key = Fernet.generate_key()
    tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key + b"\n")
            f.flush()
            os.fsync(f.fileno())
        owner = path.parent.stat()
        if os.geteuid() == 0 and (owner.st_uid, owner.st_gid) != (0, 0):
            os.chown(tmp, owner.st_uid, owner.st_gid)  # the service user can read it
        try:
            os.link(tmp, path)
        except FileExistsError:  # another process created it first: use theirs
            return path.read_bytes().strip()
    except OSError as exc:
        raise SecretError(f"cannot create the key file {path}: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return key


def derived_key(state_dir: str | Path, label: bytes) -> bytes:
    """HMAC-SHA256(key file, ``label``): a key of its own per purpose, so a value signed
    for one purpose is worthless for another. Creates the key file when missing."""
    return hmac.new(_load_or_create_key(state_dir), label, hashlib.sha256).digest()


def encrypt(state_dir: str | Path, plaintext: str) -> str:
    token = Fernet(_load_or_create_key(state_dir)).encrypt(plaintext.encode())
    return PREFIX + token.decode("ascii")


def decrypt(state_dir: str | Path, stored: str) -> str:
    if not stored.startswith(PREFIX):
        raise SecretError("the stored secret is not in a known format")
    path = key_path(state_dir)
    try:
        key = path.read_bytes().strip()
    except FileNotFoundError:
        raise SecretError(f"the key file {path} is missing: set the BMC password "
                          "again") from None
    except OSError as exc:
        raise SecretError(f"cannot read the key file {path}: {exc.strerror}") from None
    try:
        return Fernet(key).decrypt(stored[len(PREFIX):].encode("ascii")).decode()
    except (InvalidToken, ValueError):
        raise SecretError(f"the stored secret does not decrypt with {path} (was the key "
                          "file replaced?): set the BMC password again") from None
