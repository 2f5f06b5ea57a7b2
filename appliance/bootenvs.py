"""Boot environments: what a machine boots (an installer, a deploy image, its local disk).

One YAML file per boot environment in the bootenvs directory, validated at load: a file
that does not parse or has a bad field is refused with the file, the field and the reason;
the others still load. The schema (every field but ``name`` is optional unless said):

```yaml
name: debian-12                  # required, equals the file name without .yaml
description: ...
os: {family: debian, version: "12"}
local_boot: false                # true: boot the machine's own disk (no kernel)
firmware:                        # one entry per supported firmware: bios and/or uefi
  bios: {kernel: debian-12/linux, initrds: [debian-12/initrd.gz], loader: ipxe}
  uefi: {kernel: debian-12/linux, initrds: [debian-12/initrd.gz], loader: ipxe}
kernel_params: "auto=true url={{ install_url }}/preseed.cfg"   # a Jinja2 template
templates:                       # files served at <install_url>/<name>: template path
  preseed.cfg: preseed/debian-12.cfg.j2
params:                          # what the templates use: type, default, required
  timezone: {type: string, default: Etc/UTC}
artifacts:                       # what to import into the image store (sha256-checked)
  - {name: ..., source: URL or /path, sha256: ..., extract: {member: dest}}
```

Kernel and initrd paths are relative to the images directory (served at ``/images/``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from appliance.images.spec import ArtifactError, ArtifactSpec, parse_artifact
from appliance.params import ParamError, ParamSpec, parse_spec

log = logging.getLogger("appliance.bootenvs")

FIRMWARES = ("bios", "uefi")
LOADERS = ("ipxe", "grub")
#: File names a bootenv may serve: no slashes, nothing hidden.
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Names of files every machine can be shown with ``appliance render`` besides a
#: bootenv's own templates; a bootenv may not reuse them.
RESERVED_FILES = ("boot.ipxe", "grub.cfg", "kernel-params")


class BootenvError(ValueError):
    """A boot environment file is invalid; the message names the file and the field."""


@dataclass(frozen=True)
class FirmwareBoot:
    """How one firmware (bios or uefi) boots this environment."""

    kernel: str
    initrds: tuple[str, ...] = ()
    #: ``ipxe`` (the appliance's iPXE script) or ``grub`` (a GRUB config, for Secure Boot).
    loader: str = "ipxe"


@dataclass(frozen=True)
class OsInfo:
    family: str = ""
    version: str = ""


@dataclass(frozen=True)
class Bootenv:
    name: str
    description: str = ""
    os: OsInfo = field(default_factory=OsInfo)
    #: Boot the machine's own disk instead of a kernel.
    local_boot: bool = False
    firmware: dict[str, FirmwareBoot] = field(default_factory=dict)
    #: Jinja2 template string for the kernel command line.
    kernel_params: str = ""
    #: File name served to the machine -> template path under the templates directory.
    templates: dict[str, str] = field(default_factory=dict)
    params: dict[str, ParamSpec] = field(default_factory=dict)
    artifacts: tuple[ArtifactSpec, ...] = ()
    #: The file it was loaded from.
    path: str = ""

    @property
    def installs(self) -> bool:
        """True when booting it runs an installer or deploy step that reports done."""
        return bool(self.templates)

    def missing_files(self, images_dir: Path) -> list[str]:
        """Kernels and initrds not (yet) in the image store."""
        return [rel for rel in self.boot_files() if not (images_dir / rel).is_file()]

    def boot_files(self) -> list[str]:
        """Every kernel and initrd, relative to the images directory."""
        files: list[str] = []
        for boot in self.firmware.values():
            for rel in (boot.kernel, *boot.initrds):
                if rel not in files:
                    files.append(rel)
        return files


def _text(data: dict[str, Any], key: str, where: str, required: bool = False) -> str:
    value = data.get(key, "")
    if isinstance(value, int | float) and not isinstance(value, bool) and key == "version":
        value = str(value)  # os.version: 12 and "12" mean the same
    if not isinstance(value, str):
        raise BootenvError(f"{where}: field {key!r}: expected a string, got "
                           f"{type(value).__name__}")
    if required and not value:
        raise BootenvError(f"{where}: field {key!r}: required")
    return value


def _image_path(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise BootenvError(f"{where}: field {key!r}: expected a path relative to the "
                           f"images directory")
    if value.startswith("/") or ".." in PurePosixPath(value).parts:
        raise BootenvError(f"{where}: field {key!r}: {value!r} must be relative to the "
                           f"images directory, without '..'")
    return value


def _firmware(data: Any, where: str) -> dict[str, FirmwareBoot]:
    if not isinstance(data, dict) or not data:
        raise BootenvError(f"{where}: field 'firmware': expected a mapping with 'bios' "
                           f"and/or 'uefi'")
    result: dict[str, FirmwareBoot] = {}
    for name, entry in data.items():
        key = f"firmware.{name}"
        if name not in FIRMWARES:
            raise BootenvError(f"{where}: field {key!r}: unknown firmware (use bios or uefi)")
        if not isinstance(entry, dict):
            raise BootenvError(f"{where}: field {key!r}: expected a mapping with kernel, "
                               f"initrds, loader")
        unknown = sorted(map(str, set(entry) - {"kernel", "initrds", "loader"}))
        if unknown:
            raise BootenvError(f"{where}: field {key!r}: unknown field(s): "
                               f"{', '.join(unknown)}")
        kernel = _image_path(entry.get("kernel"), where, f"{key}.kernel")
        initrds = entry.get("initrds", [])
        if not isinstance(initrds, list):
            raise BootenvError(f"{where}: field '{key}.initrds': expected a list of paths")
        paths = tuple(_image_path(i, where, f"{key}.initrds") for i in initrds)
        loader = entry.get("loader", "ipxe")
        if loader not in LOADERS:
            raise BootenvError(f"{where}: field '{key}.loader': {loader!r} is not one of "
                               f"{', '.join(LOADERS)}")
        result[name] = FirmwareBoot(kernel=kernel, initrds=paths, loader=loader)
    return result


def _templates(data: Any, where: str) -> dict[str, str]:
    if not isinstance(data, dict):
        raise BootenvError(f"{where}: field 'templates': expected a mapping of file name "
                           f"-> template path")
    result: dict[str, str] = {}
    for name, template in data.items():
        if not isinstance(name, str) or not _FILE_NAME.match(name) or name in RESERVED_FILES:
            raise BootenvError(f"{where}: field 'templates': {name!r} is not a valid file "
                               f"name (letters, digits, '.', '_', '-'; not "
                               f"{', '.join(RESERVED_FILES)})")
        if not isinstance(template, str) or not template or template.startswith("/") \
                or ".." in PurePosixPath(template).parts:
            raise BootenvError(f"{where}: field 'templates.{name}': expected a template path "
                               f"relative to the templates directory")
        result[name] = template
    return result


def parse_bootenv(path: Path) -> Bootenv:
    where = str(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise BootenvError(f"{where}: YAML syntax error: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BootenvError(f"{where}: cannot read: {exc}") from None
    if not isinstance(data, dict):
        raise BootenvError(f"{where}: expected a mapping at the top level")
    known = {"name", "description", "os", "local_boot", "firmware", "kernel_params",
             "templates", "params", "artifacts"}
    unknown = sorted(str(k) for k in set(data) - known)
    if unknown:
        raise BootenvError(f"{where}: unknown field(s): {', '.join(unknown)}")
    name = _text(data, "name", where, required=True)
    if name != path.stem:
        raise BootenvError(f"{where}: field 'name': {name!r} does not match the file name")
    local_boot = data.get("local_boot", False)
    if not isinstance(local_boot, bool):
        raise BootenvError(f"{where}: field 'local_boot': expected true or false")
    os_data = data.get("os", {})
    if not isinstance(os_data, dict) or set(os_data) - {"family", "version"}:
        raise BootenvError(f"{where}: field 'os': expected a mapping with family and version")
    os_info = OsInfo(family=_text(os_data, "family", f"{where}: os"),
                     version=_text(os_data, "version", f"{where}: os"))
    firmware = {} if local_boot and "firmware" not in data else _firmware(
        data.get("firmware"), where)
    if local_boot and firmware:
        raise BootenvError(f"{where}: field 'firmware': a local_boot bootenv boots no kernel")
    params_data = data.get("params", {}) or {}
    if not isinstance(params_data, dict):
        raise BootenvError(f"{where}: field 'params': expected a mapping of name -> spec")
    try:
        params = {str(n): parse_spec(str(n), spec, where) for n, spec in params_data.items()}
    except ParamError as exc:
        raise BootenvError(f"{exc}") from None
    artifacts_data = data.get("artifacts", []) or []
    if not isinstance(artifacts_data, list):
        raise BootenvError(f"{where}: field 'artifacts': expected a list")
    try:
        artifacts = tuple(parse_artifact(a, f"{where}: artifacts[{i}]")
                          for i, a in enumerate(artifacts_data))
    except ArtifactError as exc:
        raise BootenvError(str(exc)) from None
    names = [a.name for a in artifacts]
    if len(set(names)) != len(names):
        raise BootenvError(f"{where}: field 'artifacts': duplicate artifact names")
    return Bootenv(
        name=name, description=_text(data, "description", where), os=os_info,
        local_boot=local_boot, firmware=firmware,
        kernel_params=_text(data, "kernel_params", where),
        templates=_templates(data.get("templates", {}) or {}, where),
        params=params, artifacts=artifacts, path=where,
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
