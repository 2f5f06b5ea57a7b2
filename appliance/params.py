"""Params: the values templates render with, declared by bootenvs and layered per machine.

A bootenv declares the params its templates use (type, default, required). Values come
in layers, later wins: the bootenv's defaults < the ``global`` profile < the machine's
profiles, in the order listed < the machine's own params. A value of the wrong type, or a
required param that no layer sets, is an error naming the param and the layer it came
from, never a blank in an answer file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

TYPES = ("string", "integer", "boolean", "list", "mapping")


class ParamError(ValueError):
    """A param value or declaration is invalid; the message names the param."""


@dataclass(frozen=True)
class ParamSpec:
    name: str
    type: str = "string"
    required: bool = False
    #: ``None`` means no default (the value must come from a layer if required).
    default: Any = None
    description: str = ""


def type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


def check_type(spec: ParamSpec, value: Any, where: str) -> None:
    """Refuse ``value`` if it is not of ``spec.type``; ``where`` names its layer."""
    if type_name(value) != spec.type:
        shown = json.dumps(value) if type_name(value) in TYPES else repr(value)
        raise ParamError(f"param {spec.name!r} ({where}): expected {spec.type}, got "
                         f"{type_name(value)} {shown[:80]}")
    if spec.type == "list" and not all(isinstance(item, str | int | float) for item in value):
        raise ParamError(f"param {spec.name!r} ({where}): list items must be strings "
                         f"or numbers")


def parse_spec(name: str, data: Any, where: str) -> ParamSpec:
    """One entry of a bootenv's ``params:`` mapping."""
    if not isinstance(data, dict):
        raise ParamError(f"{where}: param {name!r}: expected a mapping with type/default/"
                         f"required")
    unknown = sorted(map(str, set(data) - {"type", "required", "default", "description"}))
    if unknown:
        raise ParamError(f"{where}: param {name!r}: unknown field(s): {', '.join(unknown)}")
    kind = data.get("type", "string")
    if kind not in TYPES:
        raise ParamError(f"{where}: param {name!r}: field 'type': {kind!r} is not one of "
                         f"{', '.join(TYPES)}")
    required = data.get("required", False)
    if not isinstance(required, bool):
        raise ParamError(f"{where}: param {name!r}: field 'required': expected true or false")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise ParamError(f"{where}: param {name!r}: field 'description': expected a string")
    spec = ParamSpec(name=name, type=kind, required=required, default=data.get("default"),
                     description=description)
    if spec.default is not None:
        try:
            check_type(spec, spec.default, "default")
        except ParamError as exc:
            raise ParamError(f"{where}: {exc}") from None
    if spec.required and spec.default is not None:
        raise ParamError(f"{where}: param {name!r}: a required param has no default")
    return spec


def coerce_text(text: str, spec: ParamSpec | None) -> Any:
    """Turn a command-line or form value into the declared type.

    Undeclared params: JSON lists/mappings when the text starts with ``[`` or ``{``, else
    the text as a string (so ``hostname=0123`` stays a string).
    """
    name = spec.name if spec else "?"
    kind = spec.type if spec else ("json" if text.strip()[:1] in ("[", "{") else "string")
    if kind == "string":
        return text
    if kind == "integer":
        try:
            return int(text.strip())
        except ValueError:
            raise ParamError(f"param {name!r}: expected integer, got {text!r}") from None
    if kind == "boolean":
        lowered = text.strip().lower()
        if lowered in ("true", "yes", "on", "1"):
            return True
        if lowered in ("false", "no", "off", "0"):
            return False
        raise ParamError(f"param {name!r}: expected true or false, got {text!r}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ParamError(f"param {name!r}: expected JSON ({kind}): {exc}") from None
    if spec is not None:
        check_type(spec, value, "given value")
    return value


@dataclass(frozen=True)
class Layer:
    """One source of values: ``label`` says where they came from in error messages."""

    label: str
    values: Mapping[str, Any]


def effective_params(specs: Mapping[str, ParamSpec], layers: Iterable[Layer],
                     context: str) -> dict[str, Any]:
    """Merge defaults and layers (later wins); check declared types and required params.

    ``context`` names the bootenv and machine for the required-param message.
    """
    merged: dict[str, Any] = {name: spec.default for name, spec in specs.items()
                              if spec.default is not None}
    source: dict[str, str] = {}
    for layer in layers:
        for name, value in layer.values.items():
            merged[name] = value
            source[name] = layer.label
    for name, spec in specs.items():
        if name in source:
            check_type(spec, merged[name], f"set in {source[name]}")
    missing = [name for name, spec in specs.items() if spec.required and name not in merged]
    if missing:
        names = ", ".join(repr(n) for n in missing)
        raise ParamError(f"{context}: required param(s) {names} not set; set them on the "
                         f"machine, one of its profiles, or the global profile")
    return merged
