"""The catalog of artifacts: ``images/manifest.yaml`` plus every bootenv's ``artifacts:``.

Both places use the schema of :mod:`appliance.images.spec`. A bad entry is refused with
the file, the entry and the field; the others still load. The same name declared twice
with different content, or two artifacts writing the same file, is refused too: the
operator must say which one is meant, the appliance never guesses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from appliance.images.spec import ArtifactError, ArtifactSpec, parse_artifact


def load_manifest(path: Path) -> tuple[list[ArtifactSpec], list[str]]:
    """Parse a manifest file; return its good artifacts and one message per refused entry.

    A missing file is an empty manifest (an install may ship none); a file that does not
    parse is one error and no artifacts.
    """
    if not path.exists():
        return [], []
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        return [], [f"{path}: cannot read manifest: {exc}"]
    if data is None:
        return [], []
    if not isinstance(data, dict):
        return [], [f"{path}: expected a mapping with an 'artifacts' list at the top level"]
    unknown = sorted(map(str, set(data) - {"artifacts"}))
    errors: list[str] = []
    if unknown:
        errors.append(f"{path}: unknown top-level field(s): {', '.join(map(str, unknown))}")
    entries: Any = data.get("artifacts", [])
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        return [], [*errors, f"{path}: field 'artifacts': expected a list"]
    specs: list[ArtifactSpec] = []
    first_entry: dict[str, int] = {}
    for index, entry in enumerate(entries):
        where = f"{path}: artifacts[{index}]"
        try:
            spec = parse_artifact(entry, where)
        except ArtifactError as exc:
            errors.append(str(exc))
            continue
        if spec.name in first_entry:
            errors.append(f"{where}: artifact {spec.name!r} is already declared at "
                          f"artifacts[{first_entry[spec.name]}]; the second is refused")
            continue
        first_entry[spec.name] = index
        specs.append(spec)
    return specs, errors


def bootenv_artifacts(bootenvs: Mapping[str, Any]) -> dict[str, tuple[ArtifactSpec, ...]]:
    """The ``artifacts`` of each loaded bootenv, by bootenv name (none if it has no field)."""
    return {name: tuple(getattr(env, "artifacts", ()) or ()) for name, env in bootenvs.items()}


def shipped_manifest() -> Path | None:
    """``images/manifest.yaml`` of the checkout or the install; None when none is shipped."""
    from appliance.paths import shipped_dir

    try:
        return shipped_dir("images") / "manifest.yaml"
    except FileNotFoundError:
        return None


def _files(spec: ArtifactSpec) -> list[str]:
    return [spec.path, *spec.extract.values()]


def catalog(manifest_specs: Iterable[ArtifactSpec],
            bootenv_specs: Mapping[str, Iterable[ArtifactSpec]],
            manifest_where: str = "images/manifest.yaml",
            ) -> tuple[dict[str, ArtifactSpec], list[str]]:
    """Merge the manifest's artifacts with the bootenvs' (bootenv name -> its artifacts).

    The same declaration in several places is one artifact. A name declared with
    different content, or a file claimed by two artifacts, is an error naming both
    places; the artifact declared first is kept, the other refused.
    """
    found: dict[str, ArtifactSpec] = {}
    origin: dict[str, str] = {}
    owner: dict[str, str] = {}  # file relative to the images dir -> artifact name
    errors: list[str] = []
    sources = [(manifest_where, spec) for spec in manifest_specs]
    sources += [(f"bootenv {env}", spec)
                for env, specs in sorted(bootenv_specs.items()) for spec in specs]
    for where, spec in sources:
        previous = found.get(spec.name)
        if previous is not None:
            if previous != spec:
                errors.append(f"artifact {spec.name!r} is declared differently in "
                              f"{origin[spec.name]} and in {where}; the one in {where} "
                              f"is refused")
            continue
        files = _files(spec)
        twice = next((f for f in files if files.count(f) > 1), None)
        if twice is not None:
            errors.append(f"{where}: artifact {spec.name!r} writes {twice!r} twice; refused")
            continue
        clash = next((f for f in files if f in owner), None)
        if clash is not None:
            other = owner[clash]
            errors.append(f"{where}: artifact {spec.name!r} would write {clash!r}, which "
                          f"artifact {other!r} of {origin[other]} writes; refused")
            continue
        found[spec.name] = spec
        origin[spec.name] = where
        for f in files:
            owner[f] = spec.name
    return found, errors


def load_catalog(bootenvs_dir: str = "", manifest: Path | None = None,
                 ) -> tuple[dict[str, ArtifactSpec], list[str]]:
    """The catalog the appliance uses: the shipped manifest plus the configured bootenvs.

    Returns the artifacts and the errors of the manifest and of the merge (a refused
    bootenv file is reported by the bootenv loader itself).
    """
    from appliance.bootenvs import load_bootenvs
    from appliance.paths import resolve_dir

    manifest = manifest if manifest is not None else shipped_manifest()
    specs, errors = load_manifest(manifest) if manifest is not None else ([], [])
    try:
        envs, _env_errors = load_bootenvs(resolve_dir(bootenvs_dir, "bootenvs"))
    except FileNotFoundError as exc:
        envs = {}
        errors.append(str(exc))
    found, merge_errors = catalog(specs, bootenv_artifacts(envs),
                                  manifest_where=str(manifest or "manifest"))
    return found, errors + merge_errors
