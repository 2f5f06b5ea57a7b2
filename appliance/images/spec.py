"""What an artifact is: where it comes from, its sha256 and size, what to extract from it.

Artifacts are declared in a bootenv's ``artifacts:`` list and in ``images/manifest.yaml``;
both use this one schema. A bad declaration is refused with where it is and the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ArtifactError(ValueError):
    """An artifact declaration is invalid; the message names where and the field."""


@dataclass(frozen=True)
class ArtifactSpec:
    name: str
    #: ``http(s)://`` URL or an absolute local path.
    source: str
    sha256: str
    #: Bytes; 0 when not declared.
    size: int = 0
    #: Where the artifact itself is stored, relative to the images directory.
    path: str = ""
    #: Members to extract from an ISO or tar archive: member path -> destination
    #: relative to the images directory.
    extract: dict[str, str] = field(default_factory=dict)
    description: str = ""

    @property
    def is_url(self) -> bool:
        return self.source.startswith(("http://", "https://"))


def _relative(where: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ArtifactError(f"{where}: field {key!r}: expected a non-empty path")
    parts = PurePosixPath(value).parts
    if value.startswith("/") or ".." in parts:
        raise ArtifactError(f"{where}: field {key!r}: {value!r} must be relative to the "
                            f"images directory, without '..'")
    return value


def parse_artifact(data: Any, where: str) -> ArtifactSpec:
    """Validate one artifact declaration; ``where`` says which file and entry it is."""
    if not isinstance(data, dict):
        raise ArtifactError(f"{where}: expected a mapping with name, source, sha256")
    known = {"name", "source", "sha256", "size", "path", "extract", "description"}
    unknown = sorted(map(str, set(data) - known))
    if unknown:
        raise ArtifactError(f"{where}: unknown field(s): {', '.join(unknown)}")
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ArtifactError(f"{where}: field 'name': expected letters, digits, '.', '_' or "
                            f"'-', got {name!r}")
    where = f"{where} (artifact {name})"
    source = data.get("source")
    if not isinstance(source, str) or not (
            source.startswith(("http://", "https://")) or source.startswith("/")):
        raise ArtifactError(f"{where}: field 'source': expected an http(s) URL or an "
                            f"absolute path, got {source!r}")
    sha256 = data.get("sha256")
    if isinstance(sha256, int | float):
        raise ArtifactError(f"{where}: field 'sha256': YAML read a number; quote the 64 hex "
                            f"digits")
    if not isinstance(sha256, str) or not _SHA256.match(sha256):
        raise ArtifactError(f"{where}: field 'sha256': expected 64 lowercase hex digits, "
                            f"got {sha256!r}")
    size = data.get("size", 0)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ArtifactError(f"{where}: field 'size': expected a number of bytes, got {size!r}")
    default_path = f"{name}/{PurePosixPath(source).name}"
    path = _relative(where, "path", data.get("path", default_path))
    extract = data.get("extract", {})
    if not isinstance(extract, dict):
        raise ArtifactError(f"{where}: field 'extract': expected a mapping of member -> path")
    for member, dest in extract.items():
        if not isinstance(member, str) or not member:
            raise ArtifactError(f"{where}: field 'extract': member names must be strings")
        _relative(where, f"extract.{member}", dest)
    description = data.get("description", "")
    if not isinstance(description, str):
        raise ArtifactError(f"{where}: field 'description': expected a string")
    return ArtifactSpec(name=name, source=source, sha256=sha256, size=size, path=path,
                        extract=dict(extract), description=description)
