"""What a machine receives: its iPXE script, GRUB config, kernel command line and answer files.

The HTTP endpoints and ``appliance render`` both call ``render_machine_file``, so what the
CLI prints is exactly what the machine gets. Templates render with one context (the
contract every template may rely on):

- ``machine``: ``mac``, ``hostname``, ``ip`` (current lease or reservation, else ""),
  ``arch`` (DHCP option 93 name or ""), ``firmware`` ("bios", "uefi" or "")
- ``params``: the effective params (bootenv defaults < global < profiles < machine)
- ``bootenv``: ``name``, ``description``, ``os.family``, ``os.version``
- ``appliance_url`` (``http://host:port``), ``images_url`` (``appliance_url/images``)
- ``install_url``: ``appliance_url/install/<install token>``; the bootenv's files are
  served below it; ``done_url`` (POST when the install finished) and ``log_url`` (POST
  log lines, text or cloud-init/subiquity webhook JSON) are below it too
- ``seed_url``: the installed OS's cloud-init NoCloud seed, ``appliance_url/nocloud/<seed
  token>/`` (ends with a slash)
- ``phone_home_url``: where the installed OS's cloud-init ``phone_home`` posts (form
  fields instance_id, hostname, fqdn, pub_key_*) that it is up,
  ``appliance_url/phone-home/<seed token>``; "" without a seed token
- ``syslog_host`` and ``syslog_port``: where installers send remote syslog
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from ipaddress import ip_address, ip_network
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from appliance.bootenvs import RESERVED_FILES, Bootenv
from appliance.catalog import Catalog
from appliance.config import Config
from appliance.inventory import hostname_problem
from appliance.models import Lease, Machine, Profile, Reservation, Subnet, utcnow
from appliance.params import Layer, ParamError, effective_params
from appliance.render import RenderError, grub_words

GLOBAL_PROFILE = "global"


@dataclass(frozen=True)
class BootTarget:
    """How the machine reaches the appliance: ``base_url`` for HTTP, ``server`` for TFTP."""

    base_url: str
    server: str

    @classmethod
    def for_url(cls, base_url: str) -> BootTarget:
        """The target of an appliance URL (``http://host:port``): its host is the server."""
        base = base_url.rstrip("/")
        host = base.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
        return cls(base_url=base, server=host)


def new_token() -> str:
    """An unguessable token for per-machine URLs (192 bits, URL-safe)."""
    return secrets.token_urlsafe(24)


def firmware_of(arch: str | None) -> str:
    if not arch:
        return ""
    return "uefi" if arch.startswith("uefi") else "bios" if arch == "bios" else ""


def _reservation(session: Session, machine: Machine) -> Reservation | None:
    return session.scalar(select(Reservation).where(Reservation.mac == machine.mac))


def _address(session: Session, machine: Machine, reservation: Reservation | None) -> str:
    lease = session.scalar(
        select(Lease).where(Lease.mac == machine.mac, Lease.state == "bound",
                            Lease.expires_at > utcnow()).order_by(Lease.id.desc()).limit(1))
    if lease is not None:
        return lease.ip
    return reservation.ip if reservation is not None else ""


def machine_address(session: Session, machine: Machine) -> str:
    """The machine's current lease address, else its reservation, else ""."""
    return _address(session, machine, _reservation(session, machine))


def param_layers(session: Session, machine: Machine) -> list[Layer]:
    """global < the machine's profiles in order < the machine's own params."""
    names = [GLOBAL_PROFILE, *[p for p in (machine.profiles or []) if p != GLOBAL_PROFILE]]
    rows = {p.name: p for p in session.scalars(select(Profile).where(Profile.name.in_(names)))}
    layers = []
    for name in names:
        profile = rows.get(name)
        if profile is None:
            if name == GLOBAL_PROFILE:
                continue  # no global params set yet
            raise ParamError(f"machine {machine.mac} references profile {name!r}, which does "
                             f"not exist")
        layers.append(Layer(f"profile {name}", profile.params or {}))
    layers.append(Layer(f"machine {machine.mac}", machine.params or {}))
    return layers


def machine_params(session: Session, bootenv: Bootenv, machine: Machine) -> dict[str, Any]:
    return effective_params(bootenv.params, param_layers(session, machine),
                            f"bootenv {bootenv.name}, machine {machine.mac}")


def render_context(config: Config, session: Session, bootenv: Bootenv, machine: Machine,
                   target: BootTarget) -> dict[str, Any]:
    """The context every template renders with (see the module docstring)."""
    try:
        params = machine_params(session, bootenv, machine)
    except ParamError as exc:
        raise RenderError(f"bootenv {bootenv.name}", machine.mac, str(exc)) from None
    reservation = _reservation(session, machine)
    hostname = (params.get("hostname") or machine.hostname
                or (reservation.hostname if reservation is not None else None)
                or "m" + machine.mac.replace(":", ""))
    problem = hostname_problem(str(hostname))
    if problem:  # it goes unquoted into answer files
        raise RenderError(f"bootenv {bootenv.name}", machine.mac,
                          f"hostname {str(hostname)[:80]!r}: {problem}")
    base = target.base_url
    install_url = f"{base}/install/{machine.install_token}" if machine.install_token else ""
    return {
        "machine": {
            "mac": machine.mac, "hostname": hostname,
            "ip": _address(session, machine, reservation),
            "arch": machine.arch or "", "firmware": firmware_of(machine.arch),
        },
        "params": params,
        "bootenv": bootenv,
        "appliance_url": base,
        "images_url": f"{base}/images",
        "install_url": install_url,
        "done_url": f"{install_url}/done" if install_url else "",
        "log_url": f"{install_url}/log" if install_url else "",
        "seed_url": f"{base}/nocloud/{machine.seed_token}/" if machine.seed_token else "",
        "phone_home_url": f"{base}/phone-home/{machine.seed_token}"
        if machine.seed_token else "",
        "syslog_host": target.server,
        "syslog_port": config.syslog.port,
        # Shorthands the boot templates have always had.
        "mac": machine.mac,
        "base_url": base,
        "server": target.server,
    }


def bootenv_of(catalog: Catalog, machine: Machine) -> Bootenv:
    bootenv = catalog.bootenvs.get(machine.bootenv)
    if bootenv is None:
        refused = catalog.refusal(machine.bootenv)
        why = f" (refused: {refused})" if refused else ""
        raise RenderError("bootenv", machine.mac,
                          f"boot environment {machine.bootenv!r} is not defined{why}")
    return bootenv


def _check_images(config: Config, catalog: Catalog, bootenv: Bootenv, mac: str) -> None:
    for rel in bootenv.missing_files(config.images_dir)[:1]:
        spec = catalog.artifact_for(bootenv, rel)
        how = (f"run: appliance images import {spec.name}" if spec else
               "build or copy it there (see images/README.md)")
        raise RenderError(f"bootenv {bootenv.name}", mac,
                          f"{rel} is not in the image store {config.images_dir}; {how}")


def _render_answer(catalog: Catalog, bootenv: Bootenv, machine: Machine, name: str,
                   context: dict[str, Any]) -> str:
    if not machine.install_token:
        raise RenderError(bootenv.templates[name], machine.mac,
                          "the machine has no install in progress (no install token); "
                          "assign the bootenv again to start one")
    return catalog.renderer.render(bootenv.templates[name], machine.mac, context)


def _kernel_params(catalog: Catalog, bootenv: Bootenv, machine: Machine,
                   context: dict[str, Any]) -> str:
    text = catalog.renderer.render_string(f"bootenv {bootenv.name}: kernel_params",
                                          bootenv.kernel_params, machine.mac, context)
    return " ".join(text.split())


def render_machine_file(config: Config, session: Session, catalog: Catalog, machine: Machine,
                        name: str, target: BootTarget) -> str:
    """One file as the machine would receive it; raises RenderError naming what is wrong.

    ``name`` is ``boot.ipxe``, ``grub.cfg``, ``kernel-params`` or one of the bootenv's
    template file names (e.g. ``preseed.cfg``).
    """
    bootenv = bootenv_of(catalog, machine)
    context = render_context(config, session, bootenv, machine, target)
    if name in bootenv.templates:
        return _render_answer(catalog, bootenv, machine, name, context)
    if name not in RESERVED_FILES:
        known = ", ".join([*RESERVED_FILES, *bootenv.templates])
        raise RenderError(f"bootenv {bootenv.name}", machine.mac,
                          f"no file {name!r} (this machine's files: {known})")
    if name == "kernel-params":
        return _kernel_params(catalog, bootenv, machine, context) + "\n"
    _check_images(config, catalog, bootenv, machine.mac)
    # Answer files are rendered (and thrown away) before the machine is told to boot, so
    # a missing param stops the boot with a message instead of breaking the installer.
    for answer in bootenv.templates:
        _render_answer(catalog, bootenv, machine, answer, context)
    template = "ipxe/boot.ipxe.j2" if name == "boot.ipxe" else "grub/grub.cfg.j2"
    return catalog.renderer.render(template, machine.mac, {
        **context,
        "kernel_params": _kernel_params(catalog, bootenv, machine, context)
        if not bootenv.local_boot else "",
        "reload_ipxe_bios": config.boot.reload_ipxe_bios,
        "bios_loader": config.dhcp.bios_loader,
    })


def _ipxe_safe(text: str) -> str:
    """Make text printable by iPXE's echo: one line, no setting expansion."""
    return " ".join(text.split()).replace("$", "$$")[:400]


def render_boot_file(config: Config, session: Session, catalog: Catalog, machine: Machine,
                     name: str, target: BootTarget) -> tuple[str, str | None]:
    """``boot.ipxe`` or ``grub.cfg``: return (file, error). On error the file prints the
    error and, for iPXE, asks again later; GRUB reboots after a minute."""
    try:
        return render_machine_file(config, session, catalog, machine, name, target), None
    except RenderError as exc:
        message = str(exc)
    if name == "grub.cfg":
        return f"echo {grub_words(message)}\nsleep 60\nreboot\n", message
    script = catalog.renderer.render("ipxe/error.ipxe.j2", machine.mac, {
        "message": _ipxe_safe(message), "base_url": target.base_url, "mac": machine.mac})
    return script, message


def start_install(machine: Machine) -> None:
    """A fresh one-time install token (old answer URLs stop working) and a seed token."""
    machine.install_token = new_token()
    if not machine.seed_token:
        machine.seed_token = new_token()


def machine_by_install_token(session: Session, token: str) -> Machine | None:
    if not token or len(token) > 64:
        return None
    return session.scalar(select(Machine).where(Machine.install_token == token))


def machine_by_seed_token(session: Session, token: str) -> Machine | None:
    """The machine whose current deployment's seed (and phone-home) URL carries ``token``."""
    if not token or len(token) > 64:
        return None
    return session.scalar(select(Machine).where(Machine.seed_token == token))


def machine_by_address(session: Session, address: str) -> Machine | None:
    """The machine ``address`` belongs to now: the holder of its current (bound,
    unexpired) lease, else the machine it is reserved for.

    A reserved address does not name its machine while that machine holds a current
    lease on another address: then whoever uses the reserved address is someone else.
    """
    if not address:
        return None
    lease = session.scalar(
        select(Lease).where(Lease.ip == address, Lease.state == "bound",
                            Lease.expires_at > utcnow()).limit(1))
    if lease is not None:
        return session.scalar(select(Machine).where(Machine.mac == lease.mac))
    reservation = session.scalar(select(Reservation).where(Reservation.ip == address))
    if reservation is None:
        return None
    machine = session.scalar(select(Machine).where(Machine.mac == reservation.mac))
    if machine is None or _address(session, machine, reservation) != address:
        return None
    return machine


#: The installed OS's cloud-config (NoCloud seed and EC2 user-data), for every bootenv.
SEED_USER_DATA_TEMPLATE = "cloud-init/user-data.j2"


def deployment_bootenv(catalog: Catalog, machine: Machine) -> Bootenv:
    """The bootenv the machine's current deployment installed. Its params are the
    installed OS's (after the install the machine's own bootenv is ``local``)."""
    name = (machine.deployment or {}).get("bootenv") or machine.bootenv
    bootenv = catalog.bootenvs.get(name)
    if bootenv is None:
        refused = catalog.refusal(name)
        why = f" (refused: {refused})" if refused else ""
        raise RenderError("bootenv", machine.mac,
                          f"the deployment's boot environment {name!r} is no longer "
                          f"defined{why}")
    return bootenv


def deployment_context(config: Config, session: Session, catalog: Catalog, machine: Machine,
                       target: BootTarget) -> dict[str, Any]:
    """The render context (module docstring) of the machine's current deployment."""
    return render_context(config, session, deployment_bootenv(catalog, machine), machine,
                          target)


def render_seed_user_data(config: Config, session: Session, catalog: Catalog,
                          machine: Machine, target: BootTarget) -> str:
    """The cloud-config the installed OS reads from its NoCloud seed or EC2 metadata."""
    context = deployment_context(config, session, catalog, machine, target)
    return catalog.renderer.render(SEED_USER_DATA_TEMPLATE, machine.mac, context)


def appliance_url_for(config: Config, session: Session, machine: Machine) -> str:
    """The appliance's URL as this machine sees it, when the configuration says it.

    ``http.public_address``, else the next-server of the subnet of the machine's lease or
    reservation; "" when neither is set (the HTTP endpoints then use the request's host).
    """
    port = config.http.port
    if config.http.public_address:
        return f"http://{config.http.public_address}:{port}"
    address = machine_address(session, machine)
    if address:
        for subnet in session.scalars(select(Subnet)):
            if subnet.next_server and ip_address(address) in ip_network(subnet.network):
                return f"http://{subnet.next_server}:{port}"
    return ""
