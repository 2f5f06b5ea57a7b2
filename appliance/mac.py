"""MAC address parsing: one canonical form (lower case, colon separated) everywhere."""

from __future__ import annotations

import re

_HEX12 = re.compile(r"^[0-9a-f]{12}$")


def normalize_mac(text: str | bytes) -> str:
    """Return ``aa:bb:cc:dd:ee:ff`` for any common spelling or 6 raw bytes.

    Accepts ``AA-BB-CC-DD-EE-FF``, ``aabb.ccdd.eeff``, ``aabbccddeeff`` and colon forms.
    Raises ValueError with the offending text otherwise.
    """
    if isinstance(text, bytes | bytearray):
        if len(text) != 6:
            raise ValueError(f"MAC address must be 6 bytes, got {len(text)}")
        return bytes(text).hex(":")
    digits = re.sub(r"[:.\-]", "", text.strip().lower())
    if not _HEX12.match(digits):
        raise ValueError(f"not a MAC address: {text!r}")
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))
