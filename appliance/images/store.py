"""The image store: import artifacts into ``<state_dir>/images``, verified, and list them.

An import goes: fetch to ``<path>.part`` -> compare sha256 (and size) -> extract the
declared members into a staging directory -> move everything into place -> write the
``Image`` row. Any failure before the move leaves the previously imported version (files
and row) as it was; a file that failed verification is removed, never put in place.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from sqlalchemy import select

from appliance.config import Config
from appliance.db import Database
from appliance.images.extract import ExtractError, extract_members
from appliance.images.fetch import FetchError, fetch_local, fetch_url
from appliance.images.progress import Progress
from appliance.images.spec import ArtifactError, ArtifactSpec, parse_artifact
from appliance.models import Image, utcnow


class ImageError(Exception):
    """An import or lookup failed; the message names the artifact, its source and why."""


@dataclass
class ImportResult:
    name: str
    #: ``imported`` or ``already imported`` (nothing was done).
    status: str
    sha256: str
    size: int
    source: str
    files: list[str] = field(default_factory=list)
    #: Bytes a resumed download already had.
    resumed_from: int = 0


def files_of(spec: ArtifactSpec) -> list[str]:
    """What an import of ``spec`` puts in the images directory (relative paths)."""
    return [spec.path, *spec.extract.values()]


@contextmanager
def _import_lock(images_dir: Path, name: str) -> Iterator[None]:
    """One import of a name at a time (its ``.part`` file is shared state)."""
    lock_dir = images_dir / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with (lock_dir / f"{name}.lock").open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ImageError(f"artifact {name}: another import of it is running") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _snapshot(row: Image | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {"name": row.name, "source": row.source, "sha256": row.sha256, "size": row.size,
            "files": list(row.files or []), "imported_at": row.imported_at}


def _records(db: Database) -> dict[str, dict[str, Any]]:
    with db.session() as session:
        return {row.name: _snapshot(row)  # type: ignore[misc]
                for row in session.scalars(select(Image).order_by(Image.name))}


def _is_current(images_dir: Path, spec: ArtifactSpec, record: dict[str, Any] | None) -> bool:
    if record is None or record["sha256"] != spec.sha256 or record["files"] != files_of(spec):
        return False
    artifact = images_dir / spec.path
    try:
        if artifact.stat().st_size != record["size"]:
            return False
    except OSError:
        return False
    return all((images_dir / f).is_file() for f in record["files"])


def _fail(spec: ArtifactSpec, message: str) -> ImageError:
    return ImageError(f"artifact {spec.name} from {spec.source}: {message}")


def import_artifact(config: Config, db: Database, spec: ArtifactSpec,
                    progress: Progress | None = None, timeout: float = 30.0) -> ImportResult:
    """Import one artifact; idempotent. Raises ImageError naming what is wrong."""
    progress = progress or Progress()
    images_dir = config.images_dir
    images_dir.mkdir(parents=True, exist_ok=True)
    with _import_lock(images_dir, spec.name):
        records = _records(db)
        record = records.get(spec.name)
        if _is_current(images_dir, spec, record):
            assert record is not None
            return ImportResult(spec.name, "already imported", record["sha256"],
                                record["size"], record["source"], record["files"])
        wanted = files_of(spec)
        for other, rec in records.items():
            clash = next((f for f in wanted if other != spec.name and f in rec["files"]), None)
            if clash:
                raise _fail(spec, f"would overwrite {clash!r}, a file of image {other!r}; "
                                  f"refused")

        dest = images_dir / spec.path
        part = dest.with_name(dest.name + ".part")
        label = f"artifact {spec.name} from {spec.source}"
        try:
            if spec.is_url:
                fetched = fetch_url(label, spec.source, part, progress, title=spec.name,
                                    expected_size=spec.size, timeout=timeout)
            else:
                fetched = fetch_local(label, Path(spec.source), part, progress,
                                      title=spec.name)
        except FetchError as exc:
            raise ImageError(str(exc)) from None

        if fetched.sha256 != spec.sha256:
            part.unlink(missing_ok=True)
            raise _fail(spec, f"sha256 mismatch: expected {spec.sha256}, got "
                              f"{fetched.sha256}; the file was discarded")
        if spec.size and fetched.size != spec.size:
            part.unlink(missing_ok=True)
            raise _fail(spec, f"size mismatch: declared {spec.size} bytes, got "
                              f"{fetched.size}; the file was discarded")

        staging = images_dir / f".staging-{spec.name}-{secrets.token_hex(4)}"
        try:
            staging.mkdir()
            extract_members(part, spec.extract, staging, label=spec.source)
            # Everything is verified and extracted: put it in place.
            for rel in spec.extract.values():
                target = images_dir / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / rel, target)
            os.replace(part, dest)
        except ExtractError as exc:
            if spec.is_url:
                kept = f"; the verified download is kept as {part} for the next import"
            else:
                part.unlink(missing_ok=True)
                kept = ""
            # The readers name the archive by its source, which _fail already says.
            raise _fail(spec, f"{str(exc).removeprefix(spec.source + ': ')}{kept}") from None
        except OSError as exc:
            raise _fail(spec, f"cannot store the files: {exc}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)

        with db.session() as session:
            row = session.scalars(select(Image).where(Image.name == spec.name)).first()
            if row is None:
                row = Image(name=spec.name)
                session.add(row)
            row.source, row.sha256, row.size = spec.source, spec.sha256, fetched.size
            row.files = wanted
            row.imported_at = utcnow()
        if record is not None:
            claimed = {f for name, rec in records.items() if name != spec.name
                       for f in rec["files"]}
            for stale in set(record["files"]) - set(wanted) - claimed:
                (images_dir / stale).unlink(missing_ok=True)
        return ImportResult(spec.name, "imported", spec.sha256, fetched.size, spec.source,
                            wanted, fetched.resumed_from)


def normalize_sha256(value: str) -> str:
    """Accept ``HEX`` or ``sha256:HEX`` in either case (as checksum files print them)."""
    return value.strip().removeprefix("sha256:").removeprefix("SHA256:").lower()


def spec_for_source(source: str, sha256: str | None, name: str | None = None) -> ArtifactSpec:
    """An artifact declaration for a path or URL given on the command line.

    A file or URL with no declared checksum is never trusted: ``sha256`` is required.
    """
    if not sha256:
        raise ImageError(f"{source}: importing a path or URL needs --sha256 HEX: a file "
                         f"with no declared checksum is never trusted")
    if source.startswith(("http://", "https://")):
        resolved = source
        default_name = PurePosixPath(urlparse(source).path).name
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ImageError(f"{source}: no such file")
        resolved = str(path.resolve())
        default_name = path.name
    chosen = name or default_name
    try:
        return parse_artifact({"name": chosen, "source": resolved,
                               "sha256": normalize_sha256(sha256)}, "command line")
    except ArtifactError as exc:
        hint = "" if name else " (give a valid name with --name)"
        raise ImageError(f"{exc}{hint}") from None


def import_path_or_url(config: Config, db: Database, source: str, sha256: str | None,
                       name: str | None, catalog: Mapping[str, ArtifactSpec],
                       progress: Progress | None = None, timeout: float = 30.0,
                       ) -> ImportResult:
    """Import a file or URL that is not in the catalog, under ``name`` or its file name."""
    spec = spec_for_source(source, sha256, name)
    declared = catalog.get(spec.name)
    if declared is not None and (declared.source, declared.sha256) != (spec.source,
                                                                        spec.sha256):
        raise ImageError(f"artifact {spec.name} is declared in the catalog with source "
                         f"{declared.source} and sha256 {declared.sha256}; import it by "
                         f"name, or choose another --name")
    for other in catalog.values():
        if other.name != spec.name and spec.path in files_of(other):
            raise ImageError(f"{source}: its file {spec.path!r} belongs to artifact "
                             f"{other.name!r}; choose another --name")
    return import_artifact(config, db, spec, progress, timeout)


def list_images(config: Config, db: Database,
                catalog: Mapping[str, ArtifactSpec]) -> list[dict[str, Any]]:
    """Every artifact declared or imported, with its state and whether its files exist.

    ``state``: ``ok``, ``not imported``, ``missing files`` (imported, but a file is gone
    from disk), ``outdated`` (the declaration now names another sha256 or other files).
    """
    images_dir = config.images_dir
    records = _records(db)
    rows = []
    for name in sorted(set(catalog) | set(records)):
        spec, record = catalog.get(name), records.get(name)
        files = record["files"] if record else (files_of(spec) if spec else [])
        present = {f: (images_dir / f).is_file() for f in files}
        if record is None:
            state = "not imported"
        elif not all(present.values()):
            state = "missing files"
        elif spec is not None and (spec.sha256 != record["sha256"]
                                   or files_of(spec) != record["files"]):
            state = "outdated"
        else:
            state = "ok"
        rows.append({
            "name": name,
            "state": state,
            "imported": record is not None,
            "in_catalog": spec is not None,
            "declared_sha256": spec.sha256 if spec else None,
            "sha256": record["sha256"] if record else None,
            "size": record["size"] if record else (spec.size or None if spec else None),
            "source": record["source"] if record else (spec.source if spec else None),
            "files": [{"path": f, "present": ok} for f, ok in present.items()],
            "imported_at": record["imported_at"] if record else None,
            "description": spec.description if spec else "",
        })
    return rows
