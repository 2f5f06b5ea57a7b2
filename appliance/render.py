"""Rendering of per-machine files (iPXE scripts, kernel command lines) from Jinja2 templates.

Templates are compiled once per process and cached; the environment is sandboxed and uses
StrictUndefined, so a missing value is an error naming the template, the machine and the
variable, never an empty string in what a machine receives.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

from jinja2 import FileSystemLoader, StrictUndefined, TemplateError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment

_GRUB_SAFE = re.compile(r"^[A-Za-z0-9_.,:/=+@%^-]+$")


def grub_words(text: str) -> str:
    """Quote each word GRUB's shell would split or expand (``;``, ``$``, quotes...)."""
    return " ".join(word if _GRUB_SAFE.match(word) else "'" + word.replace("'", "'\\''") + "'"
                    for word in str(text).split())


class RenderError(Exception):
    """Rendering failed; ``str()`` names the template, the machine and the reason."""

    def __init__(self, template: str, machine: str, reason: str) -> None:
        where = template if template.startswith("bootenv") else f"template {template!r}"
        super().__init__(f"{where} for machine {machine}: {reason}")
        self.template = template
        self.machine = machine
        self.reason = reason


class Renderer:
    def __init__(self, templates_dir: Path) -> None:
        self.env = SandboxedEnvironment(
            loader=FileSystemLoader(str(templates_dir)),
            undefined=StrictUndefined,
            autoescape=False,
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
            auto_reload=False,  # no stat() per request; restart (or SIGHUP later) to reload
        )
        self.env.filters["basename"] = lambda path: str(path).rsplit("/", 1)[-1]
        self.env.filters["grub_words"] = grub_words
        self.env.filters["shquote"] = lambda value: shlex.quote(str(value))
        self._strings: dict[str, Any] = {}

    def render(self, template: str, machine: str, context: dict[str, Any]) -> str:
        try:
            return self.env.get_template(template).render(context)
        except UndefinedError as exc:
            raise RenderError(template, machine, f"undefined variable: {exc.message}") from None
        except TemplateError as exc:
            raise RenderError(template, machine, str(exc)) from None

    def render_string(self, label: str, source: str, machine: str,
                       context: dict[str, Any]) -> str:
        """Render a template string (e.g. a bootenv's kernel_params), compiled once."""
        try:
            compiled = self._strings.get(source)
            if compiled is None:
                compiled = self._strings[source] = self.env.from_string(source)
            return compiled.render(context)
        except UndefinedError as exc:
            raise RenderError(label, machine, f"undefined variable: {exc.message}") from None
        except TemplateError as exc:
            raise RenderError(label, machine, str(exc)) from None
