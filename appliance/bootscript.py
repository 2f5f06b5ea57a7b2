"""The per-machine iPXE script: what a machine boots next, rendered from its bootenv.

Used by the HTTP boot endpoint and by the CLI (to show what a machine would receive).
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.bootenvs import Bootenv
from appliance.config import Config
from appliance.models import Machine
from appliance.render import Renderer, RenderError


@dataclass(frozen=True)
class BootTarget:
    """How the machine reaches the appliance: ``base_url`` for HTTP, ``server`` for TFTP."""

    base_url: str
    server: str


def _ipxe_safe(text: str) -> str:
    """Make text printable by iPXE's echo: one line, no setting expansion."""
    return " ".join(text.split()).replace("$", "$$")[:400]


def render_boot_script(config: Config, renderer: Renderer, bootenvs: dict[str, Bootenv],
                       machine: Machine, target: BootTarget) -> tuple[str, str | None]:
    """Return (script, error). On error the script prints it and asks again later."""
    mac = machine.mac
    try:
        bootenv = bootenvs.get(machine.bootenv)
        if bootenv is None:
            raise RenderError("ipxe/boot.ipxe.j2", mac,
                              f"boot environment {machine.bootenv!r} is not defined")
        context = {
            "mac": mac,
            "hostname": machine.hostname or "",
            "appliance_url": target.base_url,
            "base_url": target.base_url,
            "server": target.server,
        }
        kernel_params = renderer.render_string(
            f"bootenv {bootenv.name}: kernel_params", bootenv.kernel_params, mac, context)
        script = renderer.render("ipxe/boot.ipxe.j2", mac, {
            **context,
            "bootenv": bootenv,
            "kernel_params": " ".join(kernel_params.split()),
            "reload_ipxe_bios": config.boot.reload_ipxe_bios,
            "bios_loader": config.dhcp.bios_loader,
        })
        return script, None
    except RenderError as exc:
        message = str(exc)
        script = renderer.render("ipxe/error.ipxe.j2", mac, {
            "message": _ipxe_safe(message), "base_url": target.base_url, "mac": mac})
        return script, message
