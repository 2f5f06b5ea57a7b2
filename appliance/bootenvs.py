"""Boot environments: what a machine boots (kernel, initrds, parameters, or its local disk).

One YAML file per boot environment in the bootenvs directory. A file that does not parse
or lacks a field is refused with the file, the field and the reason; the others load.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

log = logging.getLogger("appliance.bootenvs")


class BootenvError(ValueError):
    """A boot environment file is invalid; the message names the file and the field."""


@dataclass(frozen=True)
class Bootenv:
    name: str
    description: str = ""
    #: Boot the machine's own disk instead of a kernel.
    local_boot: bool = False
    #: Kernel path relative to the images directory (served at /images/...).
    kernel: str = ""
    initrds: tuple[str, ...] = field(default_factory=tuple)
    #: Jinja2 template string for the kernel command line.
    kernel_params: str = ""


def parse_bootenv(path: Path) -> Bootenv:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise BootenvError(f"{path}: YAML syntax error: {exc}") from None
    if not isinstance(data, dict):
        raise BootenvError(f"{path}: expected a mapping at the top level")

    def text(key: str, required: bool = False) -> str:
        value = data.get(key, "")
        if not isinstance(value, str):
            raise BootenvError(f"{path}: field {key!r}: expected a string")
        if required and not value:
            raise BootenvError(f"{path}: field {key!r}: required")
        return value

    known = {"name", "description", "local_boot", "kernel", "initrds", "kernel_params"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise BootenvError(f"{path}: unknown field(s): {', '.join(unknown)}")
    name = text("name", required=True)
    if name != path.stem:
        raise BootenvError(f"{path}: field 'name': {name!r} does not match the file name")
    local_boot = data.get("local_boot", False)
    if not isinstance(local_boot, bool):
        raise BootenvError(f"{path}: field 'local_boot': expected true or false")
    initrds = data.get("initrds", [])
    if not isinstance(initrds, list) or not all(isinstance(i, str) for i in initrds):
        raise BootenvError(f"{path}: field 'initrds': expected a list of paths")
    kernel = text("kernel", required=not local_boot)
    for rel in [kernel, *initrds]:
        if rel.startswith("/") or ".." in Path(rel).parts:
            raise BootenvError(f"{path}: path {rel!r} must be relative to the images directory")
    return Bootenv(
        name=name, description=text("description"), local_boot=local_boot, kernel=kernel,
        initrds=tuple(initrds), kernel_params=text("kernel_params"),
    )


def load_bootenvs(directory: Path) -> tuple[dict[str, Bootenv], list[str]]:
    """Load every ``*.yaml``; return the good ones and one error message per bad file."""
    envs: dict[str, Bootenv] = {}
    errors: list[str] = []
    for path in sorted(directory.glob("*.yaml")):
        try:
            env = parse_bootenv(path)
        except BootenvError as exc:
            errors.append(str(exc))
            log.error("bootenv refused: %s", exc)
            continue
        envs[env.name] = env
    return envs, errors
