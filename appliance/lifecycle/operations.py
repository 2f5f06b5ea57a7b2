"""What moves machines through the lifecycle: operators (reimage, accept, decommission),
the machine itself (boot script fetched, install done, phone-home), the power part (the
reimage's BMC requests ended) and the lifecycle part (contract checked, phases timed
out). Each function works in the caller's transaction; the CLI, the API and the web UI
call these, never the steps directly.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from appliance.catalog import Catalog
from appliance.config import Config
from appliance.lifecycle.events import record_event
from appliance.lifecycle.states import (
    AVAILABLE,
    BOOT,
    CONTRACT,
    FAILED,
    FIRST_BOOT,
    INSTALLER,
    INSTALLING,
    POWER,
    PROVISIONING,
    READY,
    LifecycleError,
    check,
    take_step,
)
from appliance.machinefiles import BootTarget, appliance_url_for, new_token, render_machine_file
from appliance.models import Machine, PowerRequest, utcnow
from appliance.render import RenderError

#: The bootenv a machine boots once its deployment is gone (decommission).
DECOMMISSIONED_BOOTENV = "discovery"
#: ``PowerRequest.purpose`` of the requests a reimage queues.
REIMAGE = "reimage"
DECOMMISSION = "decommission"
#: Longest hostname or instance id accepted from a phone-home post.
MAX_FIELD = 255


def label(machine: Machine) -> str:
    return machine.hostname or machine.mac


def deployment_params(session: Session, catalog: Catalog, machine: Machine) -> dict[str, Any]:
    """The effective params of the machine's current deployment (of the bootenv it
    installed: after the install the machine itself boots ``local``)."""
    from appliance.machinefiles import deployment_bootenv, machine_params
    from appliance.params import ParamError

    try:
        return machine_params(session, deployment_bootenv(catalog, machine), machine)
    except (RenderError, ParamError) as exc:
        raise LifecycleError(f"machine {label(machine)}: {exc}") from None


def new_instance_id() -> str:
    """An EC2-style instance id, new for every deployment (cloud-init keys its
    once-per-instance work on it: a new id makes the reinstalled OS start afresh)."""
    return "i-" + secrets.token_hex(9)[:17]


# -- operators -------------------------------------------------------------------------

def accept(config: Config, session: Session, machine: Machine, actor: str,
           reason: str = "accepted by the operator") -> None:
    take_step(session, config.lifecycle, machine, "accept", actor=actor, reason=reason,
              label=label(machine))


def reimage(config: Config, session: Session, catalog: Catalog, machine: Machine,
            bootenv: str, *, actor: str, values: Mapping[str, Any] | None = None,
            profiles: list[str] | None = None, reason: str = "") -> dict[str, Any]:
    """Start a new deployment of ``bootenv`` on the machine, from any state.

    Checked before anything changes: the bootenv exists and installs, the params satisfy
    it, and its boot script and answer files render for this machine (images present).
    Then: new install token, seed token and instance id; state provisioning; and with a
    BMC, two queued requests (next boot PXE, power cycle) that the power part runs. A
    machine without a BMC waits in provisioning/boot for someone to power it on.

    Asking again for the same bootenv and params while the machine is still in
    provisioning does nothing new (no second power cycle); the deployment is returned.
    """
    from appliance.power import control
    from appliance.profiles import ProfileError, configure_machine

    target = catalog.bootenvs.get(bootenv)
    if target is not None and not target.installs:
        raise LifecycleError(f"bootenv {bootenv!r} installs nothing (it boots "
                             f"{'the local disk' if target.local_boot else 'an image'}); "
                             "reimage needs an installing bootenv such as image-deploy")
    current = machine.deployment or {}
    wanted_values = dict(values or {})
    if (machine.state == PROVISIONING and current.get("bootenv") == bootenv
            and current.get("values") == wanted_values
            and (profiles is None or list(profiles) == list(machine.profiles or []))):
        return {**current, "unchanged": True}
    check("reimage", machine, label(machine))
    try:
        configure_machine(session, catalog, machine, bootenv=bootenv, values=wanted_values,
                          profiles=profiles, actor=actor)
    except ProfileError as exc:
        raise LifecycleError(str(exc)) from None
    machine.seed_token = new_token()  # the last deployment's seed and phone-home URLs die
    machine.instance_id = new_instance_id()
    machine.ssh_host_keys = None
    machine.contract = None
    session.flush()
    base = appliance_url_for(config, session, machine) or \
        f"http://appliance.invalid:{config.http.port}"
    try:  # what the machine will get, rendered now: a bad param stops here, not mid-boot
        render_machine_file(config, session, catalog, machine, "boot.ipxe",
                            BootTarget.for_url(base))
    except RenderError as exc:
        raise LifecycleError(f"machine {label(machine)}: not reimaged, {exc}") from None
    with_bmc = bool(machine.bmc_driver)
    number = int(current.get("number", 0)) + 1
    machine.deployment = {
        "number": number, "bootenv": bootenv, "values": wanted_values, "actor": actor,
        "reason": reason, "requested_at": utcnow().isoformat(),
        "instance_id": machine.instance_id, "power": "bmc" if with_bmc else "manual",
    }
    why = reason or f"reimage with {bootenv} (deployment {number})"
    take_step(session, config.lifecycle, machine, "reimage", actor=actor, reason=why,
              label=label(machine), phase=POWER if with_bmc else BOOT,
              details={"bootenv": bootenv, "deployment": number})
    if with_bmc:
        for operation, args in (("boot", {"device": "pxe"}), ("power", {"action": "cycle"})):
            req = control.request(session, machine, operation, args, actor)
            req.purpose = REIMAGE
    else:
        record_event(session, machine, actor, "power-manual",
                     f"no BMC: power {label(machine)} on by hand (it must boot from the "
                     "network)", {"deployment": number})
    session.flush()
    return dict(machine.deployment)


def decommission(config: Config, session: Session, machine: Machine, *, actor: str,
                 reason: str = "", power_off: bool = True) -> None:
    """End the machine's deployment: its install, seed and metadata stop answering, its
    next network boot is discovery, and (with a BMC) it is powered off. The disk is not
    wiped."""
    from appliance.power import control

    why = reason or "decommissioned"
    machine.install_token = None
    machine.seed_token = None
    machine.instance_id = None
    machine.bootenv = DECOMMISSIONED_BOOTENV
    take_step(session, config.lifecycle, machine, "decommission", actor=actor, reason=why,
              label=label(machine))
    for req in session.scalars(select(PowerRequest).where(
            PowerRequest.machine_id == machine.id, PowerRequest.state == "queued",
            PowerRequest.purpose == REIMAGE)):
        control.cancel_if_queued(session, req.id, "the machine was decommissioned")
    if power_off and machine.bmc_driver:
        req = control.request(session, machine, "power", {"action": "off"}, actor)
        req.purpose = DECOMMISSION


# -- the machine -----------------------------------------------------------------------

def booted(config: Config, session: Session, machine: Machine, client: str) -> None:
    """The machine fetched its boot script while being provisioned: it is installing."""
    if machine.state != PROVISIONING:
        return
    take_step(session, config.lifecycle, machine, "booted", actor="machine",
              reason=f"network boot from {client}: {machine.bootenv}", label=label(machine),
              details={"client": client})


def install_done(config: Config, session: Session, machine: Machine, installed: str,
                 client: str) -> None:
    """The installer reported done (its install token is already void): first boot."""
    if not (machine.state == INSTALLING and machine.phase == INSTALLER):
        return  # a bootenv assigned by hand, outside a deployment: nothing to track
    take_step(session, config.lifecycle, machine, "install-done", actor="machine",
              reason=f"{installed} install finished; booting the installed OS",
              label=label(machine), details={"client": client})


def _host_keys(form: Mapping[str, str]) -> dict[str, str]:
    keys = {}
    for field, value in form.items():
        if field.startswith("pub_key_") and value.strip():
            line = " ".join(value.split())[:16384]
            kind = line.split(" ", 1)[0]
            if kind.startswith(("ssh-", "ecdsa-", "sk-")) and " " in line:
                keys[kind] = line
    return keys


def phone_home(config: Config, session: Session, machine: Machine,
               form: Mapping[str, str], client: str) -> str:
    """cloud-init's phone_home post (form fields instance_id, hostname, fqdn,
    pub_key_*) from the installed OS. Stores the host keys and hands the machine to the
    contract check. Raises LifecycleError when it is not expected now or not from this
    deployment (the caller answers 409 and records it)."""
    instance_id = form.get("instance_id", "")[:MAX_FIELD]
    if machine.instance_id is None or instance_id != machine.instance_id:
        raise LifecycleError(f"machine {label(machine)}: phone-home for instance "
                             f"{instance_id or '(none)'!r}, but the current deployment is "
                             f"{machine.instance_id or '(none)'}")
    check("phone-home", machine, label(machine))
    keys = _host_keys(form)
    if not keys:
        raise LifecycleError(f"machine {label(machine)}: phone-home without SSH host keys "
                             "(cloud-init phone_home must post pub_key_*)")
    machine.ssh_host_keys = keys
    hostname = form.get("hostname", "")[:MAX_FIELD]
    take_step(session, config.lifecycle, machine, "phone-home", actor="machine",
              reason=f"the installed OS phoned home from {client} as {hostname or '?'}",
              label=label(machine),
              details={"client": client, "hostname": hostname,
                       "fqdn": form.get("fqdn", "")[:MAX_FIELD], "host_keys": sorted(keys)})
    return hostname


# -- the power part --------------------------------------------------------------------

def power_request_ended(config: Config, session: Session, req: PowerRequest) -> None:
    """A reimage's BMC request ended: a failure fails the deployment; the last one done
    means the machine is booting."""
    if req.purpose != REIMAGE:
        return
    machine = req.machine
    if not (machine.state == PROVISIONING and machine.phase == POWER):
        return
    if req.state != "succeeded":
        why = req.error or req.state
        fail(config, session, machine, f"BMC {req.operation} failed: {why}", actor="power",
             details={"request": req.id, "error_kind": req.error_kind})
        return
    pending = session.scalar(select(PowerRequest.id).where(
        PowerRequest.machine_id == machine.id, PowerRequest.purpose == REIMAGE,
        PowerRequest.state.in_(("queued", "running")), PowerRequest.id != req.id).limit(1))
    if pending is None:
        take_step(session, config.lifecycle, machine, "power-done", actor="power",
                  reason="next boot set to the network and power cycled; waiting for the "
                         "network boot", label=label(machine), details={"request": req.id})


# -- the lifecycle part ----------------------------------------------------------------

def fail(config: Config, session: Session, machine: Machine, reason: str, *, actor: str,
         details: dict[str, Any] | None = None) -> None:
    take_step(session, config.lifecycle, machine, "fail", actor=actor, reason=reason,
              label=label(machine), details=details)


def contract_passed(config: Config, session: Session, machine: Machine,
                    checks: dict[str, Any]) -> None:
    """The appliance confirmed the contract: ready. The install token (already void
    since install-done) is cleared for good."""
    machine.contract = {"ok": True, "checked_at": utcnow().isoformat(), **checks}
    machine.install_token = None
    take_step(session, config.lifecycle, machine, "contract-passed", actor="lifecycle",
              reason="post-provision contract confirmed: host key, operator key, no "
                     "password login", label=label(machine), details={"contract": checks})


def contract_retry(session: Session, machine: Machine, reason: str,
                   checks: dict[str, Any]) -> None:
    """A check that could not reach the machine yet: kept for the record (and for the
    timeout's reason); the machine stays in installing/contract."""
    machine.contract = {"ok": False, "reason": reason, "checked_at": utcnow().isoformat(),
                        "retrying": True, **checks}


def contract_failed(config: Config, session: Session, machine: Machine, reason: str,
                    checks: dict[str, Any]) -> None:
    machine.contract = {"ok": False, "reason": reason, "checked_at": utcnow().isoformat(),
                        **checks}
    machine.install_token = None
    fail(config, session, machine, f"post-provision contract check failed: {reason}",
         actor="lifecycle", details={"contract": checks})


def expire_phases(config: Config, session: Session) -> list[str]:
    """Fail every machine whose phase outlived its limit; returns their labels."""
    now = utcnow()
    failed = []
    stuck = session.scalars(select(Machine).where(
        Machine.phase_deadline.is_not(None), Machine.phase_deadline < now,
        Machine.state.in_((PROVISIONING, INSTALLING))).order_by(Machine.id).limit(500))
    for machine in stuck:
        started = machine.phase_started_at or now
        waited = int((now - started).total_seconds())
        what = {POWER: "the BMC did not take the boot and power requests",
                BOOT: "the machine did not boot from the network",
                INSTALLER: "the installer did not report done",
                FIRST_BOOT: "the installed OS did not phone home",
                CONTRACT: "the contract check did not pass"}.get(machine.phase or "", "")
        last = (machine.contract or {}).get("reason") if machine.phase == CONTRACT else None
        reason = (f"phase {machine.phase} timed out after {waited} s: {what}"
                  + (f" (last check: {last})" if last else ""))
        fail(config, session, machine, reason, actor="lifecycle",
             details={"timed_out_phase": machine.phase, "waited_s": waited})
        failed.append(label(machine))
    return failed


__all__ = ["AVAILABLE", "FAILED", "READY", "LifecycleError", "accept", "booted",
           "contract_failed", "contract_passed", "decommission", "expire_phases", "fail",
           "install_done", "phone_home", "power_request_ended", "reimage"]
