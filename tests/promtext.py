"""A small strict parser of the Prometheus text format (0.0.4) for the tests: it rejects
what a scraper would reject and some things a lenient one lets through (a sample outside
its family, a family twice, a duplicate series, a non-cumulative histogram)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"({_NAME})(?:\{{(.*)\}})? (\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}
Labels = tuple[tuple[str, str], ...]


@dataclass
class MetricFamily:
    name: str
    type: str
    help: str
    #: (sample name, sorted labels) -> value
    samples: dict[tuple[str, Labels], float] = field(default_factory=dict)

    def value(self, sample: str | None = None, **labels: str) -> float:
        return self.samples[(sample or self.name, tuple(sorted(labels.items())))]

    def total(self, **labels: str) -> float:
        """Sum of this family's samples whose labels include ``labels``."""
        return sum(v for (_, ls), v in self.samples.items()
                   if all((k, w) in ls for k, w in labels.items()))


def _labels(text: str) -> Labels:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        m = _LABEL.match(text, pos)
        if m is None:
            raise ValueError(f"bad labels: {text!r}")
        value = re.sub(r'\\[\\"n]', lambda e: _UNESCAPE[e.group(0)], m.group(2))
        out.append((m.group(1), value))
        pos = m.end()
    names = [k for k, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"label twice: {text!r}")
    return tuple(sorted(out))


def _value(text: str) -> float:
    if text in ("+Inf", "-Inf", "NaN"):
        return float(text.replace("Inf", "inf").replace("NaN", "nan"))
    return float(text)


def parse(text: str) -> dict[str, MetricFamily]:
    if text and not text.endswith("\n"):
        raise ValueError("text does not end with a newline")
    families: dict[str, MetricFamily] = {}
    current: MetricFamily | None = None
    pending_help: tuple[str, str] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        where = f"line {number}: {line!r}"
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            pending_help = (name, help_text)
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            if name in families:
                raise ValueError(f"family twice, {where}")
            if kind not in ("counter", "gauge", "histogram", "summary", "untyped"):
                raise ValueError(f"bad type, {where}")
            if pending_help is None or pending_help[0] != name:
                raise ValueError(f"TYPE without its HELP, {where}")
            current = families[name] = MetricFamily(name, kind, pending_help[1])
            pending_help = None
        elif line.startswith("#") or not line.strip():
            raise ValueError(f"unexpected comment or blank, {where}")
        else:
            m = _SAMPLE.fullmatch(line)
            if m is None or current is None:
                raise ValueError(f"bad sample, {where}")
            name, labels, value = m.group(1), _labels(m.group(2) or ""), _value(m.group(3))
            allowed = {current.name}
            if current.type == "histogram":
                allowed = {current.name + s for s in ("_bucket", "_sum", "_count")}
            if name not in allowed:
                raise ValueError(f"sample outside family {current.name}, {where}")
            if (name, labels) in current.samples:
                raise ValueError(f"duplicate series, {where}")
            current.samples[(name, labels)] = value
    for family in families.values():
        if family.type == "histogram":
            _check_histogram(family)
    return families


def _check_histogram(family: MetricFamily) -> None:
    series: dict[Labels, list[tuple[float, float]]] = {}
    for (name, labels), value in family.samples.items():
        if name.endswith("_bucket"):
            le = dict(labels)["le"]
            rest = tuple(kv for kv in labels if kv[0] != "le")
            series.setdefault(rest, []).append((_value(le), value))
    for rest, buckets in series.items():
        buckets.sort()
        counts = [c for _, c in buckets]
        if counts != sorted(counts) or not math.isinf(buckets[-1][0]):
            raise ValueError(f"{family.name}{dict(rest)}: buckets not cumulative or no +Inf")
        if family.samples[(family.name + "_count", rest)] != counts[-1]:
            raise ValueError(f"{family.name}{dict(rest)}: _count is not the +Inf bucket")
