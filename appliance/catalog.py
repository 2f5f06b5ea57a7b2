"""The loaded catalog: boot environments whose templates compile, and the renderer.

Loaded once per process (each HTTP worker, each CLI run). A bootenv is refused when its
YAML is bad or when a template it names is missing or does not compile; the message names
the bootenv, the template and the reason. The others still load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from jinja2 import TemplateError, TemplateNotFound, TemplateSyntaxError

from appliance.bootenvs import Bootenv, load_bootenvs
from appliance.config import Config
from appliance.images.spec import ArtifactSpec
from appliance.paths import resolve_dir
from appliance.render import Renderer

#: Templates every machine's boot uses, checked at load like a bootenv's own.
BOOT_TEMPLATES = ("ipxe/boot.ipxe.j2", "ipxe/error.ipxe.j2", "grub/grub.cfg.j2")


@dataclass
class Catalog:
    bootenvs: dict[str, Bootenv]
    renderer: Renderer
    #: One message per refused bootenv or broken shared template.
    errors: list[str] = field(default_factory=list)
    templates_dir: Path = Path()
    bootenvs_dir: Path = Path()

    def refusal(self, name: str) -> str | None:
        """Why the bootenv ``name`` was refused at load, if it was."""
        return next((e for e in self.errors if f"/{name}.yaml" in e), None)

    def artifact_for(self, bootenv: Bootenv, rel: str) -> ArtifactSpec | None:
        """The artifact of ``bootenv`` that puts ``rel`` into the images directory."""
        for spec in bootenv.artifacts:
            if spec.path == rel or rel in spec.extract.values():
                return spec
        return None


def _template_problem(renderer: Renderer, template: str) -> str | None:
    try:
        renderer.env.get_template(template)
    except TemplateNotFound:
        return f"template {template!r} not found"
    except TemplateSyntaxError as exc:
        return f"template {template!r} line {exc.lineno}: {exc.message}"
    except TemplateError as exc:
        return f"template {template!r}: {exc}"
    return None


def check_bootenv_templates(renderer: Renderer, bootenv: Bootenv) -> list[str]:
    problems = []
    for name, template in bootenv.templates.items():
        problem = _template_problem(renderer, template)
        if problem:
            problems.append(f"{bootenv.path}: field 'templates.{name}': {problem}")
    if bootenv.kernel_params:
        try:
            renderer.env.from_string(bootenv.kernel_params)
        except TemplateSyntaxError as exc:
            problems.append(f"{bootenv.path}: field 'kernel_params': template syntax error: "
                            f"{exc.message}")
    return problems


def load_catalog(config: Config) -> Catalog:
    bootenvs_dir = resolve_dir(config.boot.bootenvs_dir, "bootenvs")
    templates_dir = resolve_dir(config.boot.templates_dir, "templates")
    renderer = Renderer(templates_dir)
    bootenvs, errors = load_bootenvs(bootenvs_dir)
    for template in BOOT_TEMPLATES:
        problem = _template_problem(renderer, template)
        if problem:
            errors.append(f"{templates_dir}: {problem}")
    good: dict[str, Bootenv] = {}
    for name, bootenv in bootenvs.items():
        problems = check_bootenv_templates(renderer, bootenv)
        if problems:
            errors.extend(problems)
        else:
            good[name] = bootenv
    return Catalog(bootenvs=good, renderer=renderer, errors=errors,
                   templates_dir=templates_dir, bootenvs_dir=bootenvs_dir)
