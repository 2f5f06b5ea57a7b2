"""Where the shipped boot environments and templates are, for a checkout or an install."""

from __future__ import annotations

import sys
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent


def shipped_dir(name: str) -> Path:
    """``bootenvs`` or ``templates``: from the source tree, else the installed data files."""
    for candidate in (_CHECKOUT / name, Path(sys.prefix) / "share" / "appliance" / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"shipped {name}/ directory not found (looked beside the package "
                            f"and under {sys.prefix}/share/appliance)")


def resolve_dir(configured: str, name: str) -> Path:
    return Path(configured) if configured else shipped_dir(name)
