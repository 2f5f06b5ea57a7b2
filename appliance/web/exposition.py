"""The Prometheus text exposition format (version 0.0.4), written by hand.

A family is a ``# HELP`` and a ``# TYPE`` line followed by its samples; label values
are escaped (backslash, double quote, newline) and so is the help text (backslash,
newline). Families without samples are left out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TYPES = ("counter", "gauge", "histogram", "summary", "untyped")
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")


def escape_label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


def escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def format_value(value: float) -> str:
    """Integers as integers; floats in Python's shortest round-trip form; +Inf, -Inf,
    NaN as the format spells them."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


@dataclass
class Family:
    """One metric family. ``name`` is what the ``# TYPE`` line names: for a counter the
    full sample name (``..._total``), for a histogram the base of ``_bucket``, ``_sum``
    and ``_count``."""

    name: str
    type: str
    help: str
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name) or self.type not in TYPES:
            raise ValueError(f"bad metric family {self.name!r} ({self.type})")

    def add(self, value: float, labels: Mapping[str, str] | None = None,
            suffix: str = "") -> None:
        labels = dict(labels or {})
        for key in labels:
            if not _LABEL.match(key) or key.startswith("__"):
                raise ValueError(f"bad label name {key!r} in {self.name}")
        self.samples.append((suffix, labels, value))

    def lines(self) -> Iterable[str]:
        yield f"# HELP {self.name} {escape_help(self.help)}"
        yield f"# TYPE {self.name} {self.type}"
        for suffix, labels, value in self.samples:
            if labels:
                text = ",".join(f'{k}="{escape_label_value(str(v))}"'
                                for k, v in labels.items())
                yield f"{self.name}{suffix}{{{text}}} {format_value(value)}"
            else:
                yield f"{self.name}{suffix} {format_value(value)}"


def exposition(families: Iterable[Family]) -> str:
    """The text of ``families`` (those with samples), each name once, newline-ended."""
    out: list[str] = []
    seen: set[str] = set()
    for family in families:
        if not family.samples:
            continue
        if family.name in seen:
            raise ValueError(f"metric family {family.name} twice")
        seen.add(family.name)
        out.extend(family.lines())
    return "\n".join(out) + "\n" if out else ""
