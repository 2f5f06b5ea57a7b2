"""Profiles (named sets of params) and a machine's bootenv, profiles and params.

The CLI (and later the API and UI) call these. Values are checked against every bootenv
that declares the param, so a value of the wrong type is refused when it is set, not
when a machine boots.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from appliance.bootenvs import Bootenv
from appliance.catalog import Catalog
from appliance.inventory import InventoryError, check_hostname
from appliance.lifecycle import record_event
from appliance.mac import normalize_mac
from appliance.machinefiles import GLOBAL_PROFILE, machine_params, start_install
from appliance.models import Machine, Profile, Reservation
from appliance.params import ParamError, ParamSpec, check_type, coerce_text

_PROFILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


class ProfileError(ValueError):
    """A request was refused; the message names the bad value."""


def declared_specs(catalog: Catalog, name: str) -> list[tuple[Bootenv, ParamSpec]]:
    return [(env, env.params[name]) for env in catalog.bootenvs.values() if name in env.params]


def parse_assignments(catalog: Catalog, assignments: Iterable[str],
                      files: Iterable[str] = ()) -> dict[str, Any]:
    """``KEY=VALUE`` (typed by the bootenvs that declare KEY) and ``KEY=PATH`` files.

    A file's content is the value; for a list param, its non-empty lines that are not
    comments (an ``authorized_keys`` file works as is).
    """
    values: dict[str, Any] = {}
    for item, from_file in [(a, False) for a in assignments] + [(f, True) for f in files]:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not _PARAM_NAME.match(key):
            raise ProfileError(f"{item!r}: expected KEY=VALUE with KEY made of letters, "
                               f"digits and '_'")
        specs = declared_specs(catalog, key)
        spec = specs[0][1] if specs else None
        if from_file:
            try:
                with open(text, encoding="utf-8") as handle:
                    content = handle.read()
            except OSError as exc:
                raise ProfileError(f"param {key!r}: cannot read {text}: {exc.strerror}") from None
            if spec is not None and spec.type == "list":
                values[key] = [line.strip() for line in content.splitlines()
                               if line.strip() and not line.lstrip().startswith("#")]
                continue
            text = content.rstrip("\n")
        try:
            values[key] = coerce_text(text, spec)
        except ParamError as exc:
            raise ProfileError(str(exc)) from None
    return values


def check_values(catalog: Catalog, values: Mapping[str, Any], where: str) -> None:
    """Refuse a value whose type differs from what a bootenv declares for it."""
    for key, value in values.items():
        if not _PARAM_NAME.match(key):
            raise ProfileError(f"param {key!r}: names are letters, digits and '_'")
        for env, spec in declared_specs(catalog, key):
            try:
                check_type(spec, value, f"{where}; declared by bootenv {env.name}")
            except ParamError as exc:
                raise ProfileError(str(exc)) from None


def get_profile(session: Session, name: str) -> Profile:
    profile = session.scalar(select(Profile).where(Profile.name == name))
    if profile is None:
        raise ProfileError(f"profile {name!r} does not exist")
    return profile


def set_profile(session: Session, catalog: Catalog, name: str, values: Mapping[str, Any],
                unset: Iterable[str] = (), description: str | None = None,
                actor: str = "cli") -> Profile:
    """Create the profile if needed, then set and unset params on it."""
    if not _PROFILE_NAME.match(name):
        raise ProfileError(f"profile name {name!r}: use letters, digits, '.', '_' or '-'")
    check_values(catalog, values, f"profile {name}")
    # A savepoint: a refused change leaves the caller's session as it was.
    with session.begin_nested():
        profile = session.scalar(select(Profile).where(Profile.name == name))
        if profile is None:
            profile = Profile(name=name, params={}, description="")
            session.add(profile)
        params = dict(profile.params or {})
        params.update(values)
        for key in unset:
            if key not in params:
                raise ProfileError(f"profile {name}: param {key!r} is not set")
            params.pop(key)
        profile.params = params
        if description is not None:
            profile.description = description
        session.flush()
        _check_installs_still_render(session, catalog, name)
    record_event(session, None, actor, "profile-set", f"profile {name} updated",
                 {"profile": name, "set": sorted(values), "unset": sorted(unset)})
    return profile


def _check_installs_still_render(session: Session, catalog: Catalog, profile: str) -> None:
    """Refuse a profile change that would break an install in progress (its answer files
    are fetched from now on with the new values)."""
    installing = session.scalars(select(Machine).where(Machine.install_token.is_not(None)))
    for machine in installing:
        if profile != GLOBAL_PROFILE and profile not in (machine.profiles or []):
            continue
        bootenv = catalog.bootenvs.get(machine.bootenv)
        if bootenv is None:
            continue
        try:
            machine_params(session, bootenv, machine)
        except ParamError as exc:
            raise ProfileError(f"profile {profile}: change refused, machine {machine.mac} is "
                               f"installing {bootenv.name} with it: {exc}") from None


def delete_profile(session: Session, name: str, actor: str = "cli") -> None:
    profile = get_profile(session, name)
    users = [m.mac for m in session.scalars(select(Machine)) if name in (m.profiles or [])]
    if users:
        raise ProfileError(f"profile {name} is used by {len(users)} machine(s), e.g. "
                           f"{users[0]}; remove it from them first")
    session.delete(profile)
    record_event(session, None, actor, "profile-deleted", f"profile {name} deleted")


def list_profiles(session: Session) -> list[Profile]:
    return list(session.scalars(select(Profile).order_by(Profile.name)))


def find_machine(session: Session, ident: str) -> Machine:
    """A machine by MAC, or by hostname (its own or its reservation's)."""
    try:
        mac = normalize_mac(ident)
    except ValueError:
        mac = None
    if mac:
        machine = session.scalar(select(Machine).where(Machine.mac == mac))
        if machine is not None:
            return machine
        raise ProfileError(f"no machine with MAC {mac}")
    matches = list(session.scalars(select(Machine).where(Machine.hostname == ident)))
    if not matches:
        reserved = session.scalar(select(Reservation).where(Reservation.hostname == ident))
        if reserved is not None:
            matches = list(session.scalars(select(Machine).where(Machine.mac == reserved.mac)))
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ProfileError(f"hostname {ident!r} matches {len(matches)} machines; use the MAC")
    raise ProfileError(f"no machine {ident!r} (give its MAC or hostname)")


def configure_machine(session: Session, catalog: Catalog, machine: Machine, *,
                      bootenv: str | None = None, profiles: list[str] | None = None,
                      values: Mapping[str, Any] | None = None, unset: Iterable[str] = (),
                      hostname: str | None = None, actor: str = "cli") -> Machine:
    """Change what a machine boots and renders with; checked before anything is stored.

    Assigning a bootenv that installs starts a new install (fresh one-time install token),
    and the machine's params must then satisfy that bootenv, or nothing is changed.
    """
    values = dict(values or {})
    check_values(catalog, values, f"machine {machine.mac}")
    try:
        check_hostname(hostname)
        if isinstance(values.get("hostname"), str):
            check_hostname(values["hostname"])
    except InventoryError as exc:
        raise ProfileError(str(exc)) from None
    if bootenv is not None and bootenv not in catalog.bootenvs:
        refused = catalog.refusal(bootenv)
        raise ProfileError(f"bootenv {bootenv!r} is not defined" +
                           (f" (refused: {refused})" if refused else
                            f"; known: {', '.join(sorted(catalog.bootenvs))}"))
    if profiles is not None:
        for name in profiles:
            get_profile(session, name)
    params = dict(machine.params or {})
    params.update(values)
    for key in unset:
        if key not in params:
            raise ProfileError(f"machine {machine.mac}: param {key!r} is not set")
        params.pop(key)
    new_profiles = [p for p in profiles if p != GLOBAL_PROFILE] if profiles is not None \
        else list(machine.profiles or [])
    target = catalog.bootenvs.get(bootenv or machine.bootenv)
    if target is not None:
        probe = Machine(mac=machine.mac, profiles=new_profiles, params=params)
        try:
            machine_params(session, target, probe)
        except ParamError as exc:
            raise ProfileError(str(exc)) from None
    changes: dict[str, Any] = {}
    if params != (machine.params or {}):
        machine.params = params
        changes["params"] = sorted(set(values) | set(unset))
    if new_profiles != (machine.profiles or []):
        machine.profiles = new_profiles
        changes["profiles"] = new_profiles
    if hostname is not None and hostname != machine.hostname:
        machine.hostname = hostname or None
        changes["hostname"] = hostname
    if bootenv is not None:
        machine.bootenv = bootenv
        changes["bootenv"] = bootenv
        if catalog.bootenvs[bootenv].installs:
            start_install(machine)
            changes["install"] = "new install token"
        else:
            machine.install_token = None
    if changes:
        record_event(session, machine, actor, "machine-configured",
                     ", ".join(f"{k}: {v}" for k, v in changes.items()), changes)
    session.flush()
    return machine
