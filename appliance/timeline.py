"""A machine's last provisioning run, phase by phase, drawn from its events.

The run starts at the last ``reimage`` state event. Each phase ends at a milestone event
and starts where the phase before it ended, so the phases tile the run without gaps and
their durations add up to the run's length:

=============  ===========================================================================
phase          ends at
=============  ===========================================================================
power          the lifecycle step ``power-done`` (BMC set the next boot and cycled power);
               skipped when the machine has no BMC (powered on by hand)
dhcp           the first DHCP ACK after that (firmware start-up is inside this phase)
tftp           the last boot loader transfer (TFTP, or the TFTP root over HTTP) before the
               first kernel/initrd download; skipped when the firmware chained straight
               to the boot script (iPXE ROM, UEFI HTTP boot)
script         the last boot script fetched before the first kernel/initrd download
kernel/initrd  the end of the last kernel or initrd download before the install is done
installer      the lifecycle step ``install-done`` (named ``deploy`` for image deploys)
reboot         the installed OS's first datasource fetch (cloud-init asking for user-data)
cloud-init     the lifecycle step ``phone-home``
phone-home     the same moment: a milestone, shown with the host it phoned home as
contract       ``contract-passed`` (the machine is ready)
=============  ===========================================================================

The first phase whose milestone has not come is ``running`` (since the previous one
ended), or ``failed`` when the run failed (a ``fail`` step); the ones after it are
``pending``. Error events inside a phase's span (a BMC failure, a boot script or answer
file that did not render, a failed TFTP transfer) are listed with it, so the picture
shows where a machine got stuck and why.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from appliance.models import Event, Machine, utcnow

#: Event kinds the network boot path writes for machines being provisioned.
DHCP = "dhcp"
TFTP = "tftp"
DOWNLOAD = "download"
#: ``download`` roles (details["role"]).
LOADER, KERNEL, INITRD, FILE = "loader", "kernel", "initrd", "file"

#: Event kinds that are problems worth showing beside the phase they happened in.
PROBLEM_KINDS = frozenset({"power-failed", "power-request-failed", "boot-script-error",
                           "answer-file-error", "user-data-error", "install-log-error"})

#: (key, label) in run order.
PHASES: tuple[tuple[str, str], ...] = (
    ("power", "power"), ("dhcp", "DHCP"), ("tftp", "TFTP"), ("script", "script"),
    ("kernel", "kernel/initrd"), ("installer", "installer"), ("reboot", "reboot"),
    ("cloud-init", "cloud-init"), ("phone-home", "phone-home"), ("contract", "contract"),
)

#: How many events of one run are read at most (a run has a few dozen).
MAX_EVENTS = 5000


class EventLike(Protocol):
    id: int
    at: dt.datetime
    kind: str
    message: str
    details: dict[str, Any] | None


@dataclass
class Phase:
    key: str
    label: str
    #: done, running, failed, skipped or pending
    status: str = "pending"
    start: dt.datetime | None = None
    end: dt.datetime | None = None
    #: What marked the phase's end (or, running, the last thing seen in it).
    detail: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float | None:
        if self.start is None or self.end is None:
            return None
        return round(max((self.end - self.start).total_seconds(), 0.0), 1)

    def as_dict(self) -> dict[str, Any]:
        return {"phase": self.key, "label": self.label, "status": self.status,
                "start": _iso(self.start), "end": _iso(self.end), "seconds": self.seconds,
                "detail": self.detail, "problems": list(self.problems)}


@dataclass
class Timeline:
    #: none (never reimaged), running, ready, failed or ended (decommissioned/reimaged)
    outcome: str
    started: dt.datetime | None = None
    ended: dt.datetime | None = None
    #: now, for a running run: where the picture's right edge is
    drawn_until: dt.datetime | None = None
    bootenv: str = ""
    deployment: int | None = None
    reason: str = ""
    phases: list[Phase] = field(default_factory=list)

    @property
    def seconds(self) -> float | None:
        if self.started is None or self.drawn_until is None:
            return None
        return round((self.drawn_until - self.started).total_seconds(), 1)

    def as_dict(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "started": _iso(self.started),
                "ended": _iso(self.ended), "seconds": self.seconds, "bootenv": self.bootenv,
                "deployment": self.deployment, "reason": self.reason,
                "phases": [p.as_dict() for p in self.phases]}


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _details(event: EventLike) -> dict[str, Any]:
    return event.details if isinstance(event.details, dict) else {}


def _step(event: EventLike) -> str | None:
    return _details(event).get("step") if event.kind == "state" else None


def is_run_start(event: EventLike) -> bool:
    return _step(event) == "reimage"


def _first(events: Sequence[EventLike], after: dt.datetime, test) -> EventLike | None:  # type: ignore[no-untyped-def]
    return next((e for e in events if e.at >= after and test(e)), None)


def _last_before(events: Sequence[EventLike], after: dt.datetime,
                 before: dt.datetime | None, test) -> EventLike | None:  # type: ignore[no-untyped-def]
    found = None
    for e in events:
        if e.at < after:
            continue
        if before is not None and e.at > before:
            break
        if test(e):
            found = e
    return found


def _role(event: EventLike) -> str:
    return str(_details(event).get("role", ""))


def _is_loader(e: EventLike) -> bool:
    return e.kind == TFTP or (e.kind == DOWNLOAD and _role(e) == LOADER)


def _is_kernel(e: EventLike) -> bool:
    return e.kind == DOWNLOAD and _role(e) in (KERNEL, INITRD)


def _is_ack(e: EventLike) -> bool:
    return e.kind == DHCP and _details(e).get("type") == "ack"


def _is_datasource(e: EventLike) -> bool:
    return e.kind == "user-data"


def build(events: Iterable[EventLike], now: dt.datetime | None = None) -> Timeline:
    """The timeline of the last run in ``events`` (one machine's, in id order)."""
    ordered = sorted(events, key=lambda e: e.id)
    start_index = max((i for i, e in enumerate(ordered) if is_run_start(e)), default=None)
    if start_index is None:
        return Timeline(outcome="none")
    # From the reimage on, in the order things happened: the DHCP and TFTP parts write
    # their events a moment later with the packet's time, so ids are not quite in order.
    begin = ordered[start_index]
    run = [begin, *sorted(ordered[start_index + 1:], key=lambda e: e.at)]
    info = _details(begin)
    timeline = Timeline(outcome="running", started=begin.at, bootenv=str(info.get("bootenv", "")),
                        deployment=info.get("deployment"), reason=str(info.get("reason", "")))
    end_event = next((e for e in run[1:] if _step(e) in ("contract-passed", "fail",
                                                         "decommission")), None)
    if end_event is not None:
        run = run[:run.index(end_event) + 1]
        step = _step(end_event)
        timeline.outcome = {"contract-passed": "ready", "fail": "failed"}.get(step or "",
                                                                             "ended")
        timeline.ended = end_event.at
    timeline.drawn_until = timeline.ended or max(now or utcnow(), run[-1].at)
    milestones = _milestones(run, begin, manual_power=info.get("phase") == "boot")
    installer_label = "deploy" if "deploy" in timeline.bootenv else "installer"
    timeline.phases = _phases(milestones, begin.at, timeline, installer_label)
    _attach_problems(timeline, run)
    return timeline


def _milestones(run: Sequence[EventLike], begin: EventLike,
                manual_power: bool) -> dict[str, tuple[EventLike, str] | None | str]:
    """Phase key -> (the event that ended it, what to say), None (not yet) or "skipped"."""
    found: dict[str, tuple[EventLike, str] | None | str] = {}
    at = begin.at
    if manual_power:
        found["power"] = "skipped"
    else:
        e = _first(run, at, lambda e: _step(e) == "power-done")
        found["power"] = (e, "next boot set, power cycled") if e else None
        at = e.at if e else at
    ack = _first(run, at, _is_ack) if found["power"] is not None else None
    found["dhcp"] = (ack, ack.message) if ack else None
    after_dhcp = ack.at if ack else at
    first_kernel = _first(run, after_dhcp, _is_kernel) if ack else None
    limit = first_kernel.at if first_kernel else None
    loader = _last_before(run, after_dhcp, limit, _is_loader) if ack else None
    script = _last_before(run, after_dhcp, limit,
                          lambda e: e.kind == "boot-script") if ack else None
    if loader is not None and script is not None and loader.at > script.at:
        script = None  # the boot loader came after the last script: its script is due
    if script is not None:
        found["tftp"] = (loader, loader.message) if loader else "skipped"
        found["script"] = (script, script.message)
    else:
        found["tftp"] = (loader, loader.message) if loader and first_kernel else None
        found["script"] = None
    install_done = _first(run, begin.at, lambda e: _step(e) == "install-done")
    kernel = (_last_before(run, script.at, install_done.at if install_done else None,
                           _is_kernel) if script is not None else None)
    if kernel is not None and install_done is None and not (
            _role(kernel) == INITRD or _installer_started(run, kernel)):
        kernel = None  # the kernel came, its initrd is still on the way
    found["kernel"] = (kernel, kernel.message) if kernel else None
    found["installer"] = (install_done, "install finished") if install_done else None
    datasource = (_first(run, install_done.at, _is_datasource) if install_done else None)
    found["reboot"] = (datasource, datasource.message) if datasource else None
    phoned = _first(run, begin.at, lambda e: _step(e) == "phone-home")
    if phoned is not None:
        host = _details(phoned).get("hostname") or "?"
        found["cloud-init"] = (phoned, "cloud-init phoned home")
        found["phone-home"] = (phoned, f"phoned home as {host}")
        if found["reboot"] is None:
            found["reboot"] = "skipped"
    else:
        found["cloud-init"] = found["phone-home"] = None
    passed = _first(run, begin.at, lambda e: _step(e) == "contract-passed")
    found["contract"] = (passed, "contract confirmed") if passed else None
    return found


def _installer_started(run: Sequence[EventLike], kernel: EventLike) -> bool:
    """Something after the download that only a running installer or deploy does."""
    return any(e.id > kernel.id and e.kind in ("answer-file", "install-log",
                                               "install-finished", "checkin")
               for e in run)


def _phases(found: dict[str, tuple[EventLike, str] | None | str], begin: dt.datetime,
            timeline: Timeline, installer_label: str) -> list[Phase]:
    phases = []
    clock = begin
    open_phase: Phase | None = None
    for key, label in PHASES:
        phase = Phase(key, installer_label if key == "installer" else label)
        mark = found.get(key)
        if open_phase is not None:
            phase.status = "pending"
        elif mark == "skipped":
            phase.status = "skipped"
        elif isinstance(mark, tuple):
            event, say = mark
            phase.status, phase.start, phase.end, phase.detail = "done", clock, event.at, say
            clock = max(clock, event.at)
        else:
            phase.start = clock
            phase.end = timeline.drawn_until
            phase.status = "failed" if timeline.outcome == "failed" else (
                "running" if timeline.outcome == "running" else "ended")
            open_phase = phase
        phases.append(phase)
    return phases


def _attach_problems(timeline: Timeline, run: Sequence[EventLike]) -> None:
    """Error events go to the phase whose span holds them; a phase still open says what
    was seen last in it."""
    spans = [p for p in timeline.phases if p.start is not None and p.end is not None]
    if not spans:
        return
    for e in run:
        if not (e.kind in PROBLEM_KINDS or _step(e) == "fail"
                or (e.kind == TFTP and not _details(e).get("ok", True))):
            continue
        holder = next((p for p in spans if p.start <= e.at <= p.end),  # type: ignore[operator]
                      spans[-1])
        holder.problems.append(e.message)
    for p in spans:
        if p.status != "done" and not p.detail:
            last = next((e for e in reversed(run) if e.at >= p.start  # type: ignore[operator]
                         and e.kind != "state"), None)
            p.detail = last.message if last is not None else ""


def run_events(session: Session, machine: Machine) -> list[Event]:
    """The events of the machine's last provisioning run (from its reimage on)."""
    states = session.scalars(
        select(Event).where(Event.machine_id == machine.id, Event.kind == "state")
        .order_by(Event.id.desc()).limit(200))
    start = next((e for e in states if is_run_start(e)), None)
    if start is None:
        return []
    return list(session.scalars(
        select(Event).where(Event.machine_id == machine.id, Event.id >= start.id)
        .order_by(Event.id).limit(MAX_EVENTS)))


def timeline_for(session: Session, machine: Machine,
                 now: dt.datetime | None = None) -> Timeline:
    return build(run_events(session, machine), now)
