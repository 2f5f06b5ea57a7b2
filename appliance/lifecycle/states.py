"""The lifecycle as an explicit state machine: states, phases, and the steps between them.

::

    discovered --accept--> available
    any state --reimage--> provisioning/power (BMC) or provisioning/boot (power by hand)
    provisioning/power --power-done--> provisioning/boot
    provisioning/power|boot --booted--> installing/installer   (boot script fetched)
    installing/installer --install-done--> installing/first-boot
    installing/first-boot --phone-home--> installing/contract
    installing/contract --contract-passed--> ready
    provisioning|installing --fail--> failed   (BMC failure, timeout, contract failure)
    any state --decommission--> available

Every step is one conditional UPDATE of the machine row (``state_serial`` compared and
bumped), in the caller's transaction, with one ``state`` event naming who, why and how
long the previous phase took. Of two concurrent steps on one machine only one can win;
the other gets :class:`LifecycleError` and its transaction rolls back.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from appliance.config import LifecycleConfig
from appliance.lifecycle.events import DISCOVERED, record_event
from appliance.models import Event, Machine, utcnow

AVAILABLE = "available"
PROVISIONING = "provisioning"
INSTALLING = "installing"
READY = "ready"
FAILED = "failed"
STATES = (DISCOVERED, AVAILABLE, PROVISIONING, INSTALLING, READY, FAILED)

POWER = "power"
BOOT = "boot"
INSTALLER = "installer"
FIRST_BOOT = "first-boot"
CONTRACT = "contract"
PHASES = {PROVISIONING: (POWER, BOOT), INSTALLING: (INSTALLER, FIRST_BOOT, CONTRACT)}

#: Config setting (``[lifecycle]``) holding each phase's time limit.
PHASE_TIMEOUT_SETTING = {POWER: "power_timeout", BOOT: "boot_timeout",
                         INSTALLER: "installer_timeout", FIRST_BOOT: "first_boot_timeout",
                         CONTRACT: "contract_timeout"}

ANY = "*"


class LifecycleError(ValueError):
    """A step refused: illegal from the machine's state, or lost to a concurrent one."""


@dataclass(frozen=True)
class Step:
    name: str
    #: (state, phase) pairs it may start from; phase None matches any phase; ANY: all.
    sources: tuple[tuple[str, str | None], ...] | str
    target: str
    #: Phase entered (None: the state has no phases; "*": chosen by the caller).
    phase: str | None
    #: What the operator is told when the step is refused.
    hint: str = ""


STEPS = {s.name: s for s in (
    Step("accept", ((DISCOVERED, None),), AVAILABLE, None,
         "only a discovered machine is accepted; reimage or decommission it instead"),
    Step("reimage", ANY, PROVISIONING, "*"),
    Step("power-done", ((PROVISIONING, POWER),), PROVISIONING, BOOT),
    Step("booted", ((PROVISIONING, POWER), (PROVISIONING, BOOT)), INSTALLING, INSTALLER,
         "the machine is not being provisioned"),
    Step("install-done", ((INSTALLING, INSTALLER),), INSTALLING, FIRST_BOOT,
         "no install is in progress"),
    Step("phone-home", ((INSTALLING, FIRST_BOOT),), INSTALLING, CONTRACT,
         "the machine is not waiting for its first boot"),
    Step("contract-passed", ((INSTALLING, CONTRACT),), READY, None),
    Step("fail", ((PROVISIONING, None), (INSTALLING, None)), FAILED, None,
         "only a machine being provisioned or installed can fail"),
    Step("decommission", ANY, AVAILABLE, None),
)}


def where(machine: Machine) -> str:
    return f"{machine.state}/{machine.phase}" if machine.phase else machine.state


def allowed(step: Step, machine: Machine) -> bool:
    if step.sources == ANY:
        return True
    return any(machine.state == state and (phase is None or machine.phase == phase)
               for state, phase in step.sources)


def check(step_name: str, machine: Machine, label: str) -> Step:
    """The step, or LifecycleError saying why the machine cannot take it now."""
    step = STEPS[step_name]
    if not allowed(step, machine):
        hint = f" ({step.hint})" if step.hint else ""
        raise LifecycleError(f"machine {label}: cannot {step_name} a machine that is "
                             f"{where(machine)}{hint}")
    return step


def deadline_for(config: LifecycleConfig, phase: str | None,
                 now: dt.datetime) -> dt.datetime | None:
    seconds = getattr(config, PHASE_TIMEOUT_SETTING[phase]) if phase in \
        PHASE_TIMEOUT_SETTING else 0
    return now + dt.timedelta(seconds=seconds) if seconds else None


def take_step(session: Session, config: LifecycleConfig, machine: Machine, step_name: str,
              *, actor: str, reason: str, label: str, phase: str | None = None,
              details: dict[str, Any] | None = None) -> Event:
    """Move the machine by one step: a conditional UPDATE plus one ``state`` event.

    Pending changes of the caller are flushed first, so they are part of the same
    transaction. Raises LifecycleError when the step is illegal from the machine's state
    or another transaction moved the machine first.
    """
    step = check(step_name, machine, label)
    target_phase = phase if step.phase == "*" else step.phase
    if target_phase is not None and target_phase not in PHASES.get(step.target, ()):
        raise ValueError(f"phase {target_phase!r} is not a phase of {step.target}")
    session.flush()
    now = utcnow()
    before_state, before_phase = machine.state, machine.phase
    since = machine.phase_started_at
    serial = machine.state_serial or 0
    result = session.execute(
        update(Machine)
        .where(Machine.id == machine.id, Machine.state_serial == serial)
        .values(state=step.target, phase=target_phase, phase_started_at=now,
                phase_deadline=deadline_for(config, target_phase, now),
                state_reason=reason, state_serial=serial + 1)
        .execution_options(synchronize_session=False))
    if result.rowcount != 1:
        raise LifecycleError(f"machine {label}: changed by another request at the same time "
                             f"(wanted to {step_name}); look at its state and try again")
    session.refresh(machine, ["state", "phase", "phase_started_at", "phase_deadline",
                              "state_reason", "state_serial"])
    previous = f"{before_state}/{before_phase}" if before_phase else before_state
    info: dict[str, Any] = {"step": step_name, "from": before_state, "from_phase": before_phase,
                            "to": step.target, "phase": target_phase, "reason": reason}
    if since is not None:
        info["previous_phase_s"] = round((now - since).total_seconds(), 3)
    if machine.instance_id:
        info["instance_id"] = machine.instance_id
    info.update(details or {})
    return record_event(session, machine, actor, "state",
                        f"{previous} -> {where(machine)}: {reason}", info)
