"""Geometry of the boot timeline picture: one row per phase, a bar from the phase's start
to its end on a time axis spanning the whole run (the drawing is in the template)."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.timeline import Phase, Timeline

WIDTH = 860
LABEL_WIDTH = 110
AXIS_WIDTH = 600
ROW_HEIGHT = 24
TOP = 24


@dataclass(frozen=True)
class Row:
    phase: Phase
    y: int
    x: float
    width: float
    #: what is written right of the bar
    text: str


def duration_text(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest:02d} s"


def rows(timeline: Timeline) -> list[Row]:
    total = timeline.seconds or 0.0
    scale = AXIS_WIDTH / total if total > 0 else 0.0
    out = []
    for i, phase in enumerate(timeline.phases):
        y = TOP + i * ROW_HEIGHT
        if phase.start is None or timeline.started is None:
            text = {"skipped": "skipped", "pending": ""}.get(phase.status, phase.status)
            out.append(Row(phase, y, LABEL_WIDTH, 0.0, text))
            continue
        offset = max((phase.start - timeline.started).total_seconds(), 0.0)
        x = LABEL_WIDTH + offset * scale
        width = max((phase.seconds or 0.0) * scale, 2.0)  # a milestone is still visible
        text = duration_text(phase.seconds)
        if phase.status in ("running", "failed", "ended"):
            text = f"{text} ({phase.status})"
        out.append(Row(phase, y, x, min(width, LABEL_WIDTH + AXIS_WIDTH - x + 2), text))
    return out


def height(timeline: Timeline) -> int:
    return TOP + len(timeline.phases) * ROW_HEIGHT + 8
