"""``appliance images import NAME|PATH|URL`` and ``appliance images list``.

``register(subparsers)`` adds the ``images`` command to the appliance's parser; the
parser calls ``run(args, config)``. Errors are one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from appliance.config import Config
from appliance.db import Database
from appliance.images.manifest import load_catalog
from appliance.images.progress import Progress, StreamProgress
from appliance.images.store import (
    ImageError,
    ImportResult,
    import_artifact,
    import_path_or_url,
    list_images,
    normalize_sha256,
)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``images`` to an ``add_subparsers()`` object; returns its parser."""
    text = "the image store: import and list kernels, initrds, ISOs and OS images"
    parser = subparsers.add_parser("images", help=text, description=text)
    parser.set_defaults(func=run)
    sub = parser.add_subparsers(dest="images_action", required=True, metavar="ACTION")
    imp = sub.add_parser(
        "import", help="download or copy an artifact, verify its sha256, extract it",
        description="Import an artifact declared in images/manifest.yaml or a bootenv "
                    "(by NAME), or any file or URL with --sha256. Downloads resume.")
    imp.add_argument("target", metavar="NAME|PATH|URL")
    imp.add_argument("--sha256", metavar="HEX",
                     help="checksum of a PATH or URL (required for them; for a NAME it "
                          "must match the declaration)")
    imp.add_argument("--name", help="name for a PATH or URL (default: its file name)")
    imp.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    ls = sub.add_parser("list", help="declared and imported artifacts, and their state")
    ls.add_argument("--json", action="store_true")
    return parser


def _is_source(target: str) -> bool:
    return target.startswith(("http://", "https://")) or "/" in target or Path(target).exists()


def _import(args: argparse.Namespace, config: Config, db: Database,
            catalog: dict[str, Any], errors: list[str]) -> ImportResult:
    progress: Progress = Progress() if args.quiet else StreamProgress(sys.stderr)
    target = args.target
    spec = catalog.get(target)
    if spec is not None and not _is_source(target):
        if args.name:
            raise ImageError(f"{target}: --name applies to a PATH or URL, not to a declared "
                             f"artifact")
        if args.sha256 and normalize_sha256(args.sha256) != spec.sha256:
            raise ImageError(f"artifact {target}: --sha256 {args.sha256} differs from the "
                             f"declared {spec.sha256}")
        return import_artifact(config, db, spec, progress)
    if _is_source(target):
        return import_path_or_url(config, db, target, args.sha256, args.name, catalog,
                                  progress)
    related = [e for e in errors if f"'{target}'" in e or f"artifact {target})" in e]
    if related:
        raise ImageError(f"artifact {target}: its declaration was refused: {related[0]}")
    known = ", ".join(sorted(catalog)) or "(none)"
    raise ImageError(f"{target}: no such artifact (known: {known}), file or URL")


def _size(n: Any) -> str:
    if not n:
        return ""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)  # pragma: no cover


def run(args: argparse.Namespace, config: Config) -> int:
    try:
        catalog, errors = load_catalog(config.boot.bootenvs_dir)
        for error in errors:
            print(f"appliance: warning: {error}", file=sys.stderr)
        db = Database(config.effective_database_url)
        try:
            if args.images_action == "import":
                result = _import(args, config, db, catalog, errors)
                if result.status == "already imported":
                    print(f"artifact {result.name} is already imported (sha256 "
                          f"{result.sha256}, files present); nothing to do")
                else:
                    resumed = (f", resumed at byte {result.resumed_from}"
                               if result.resumed_from else "")
                    print(f"artifact {result.name} imported: {result.size} bytes, sha256 "
                          f"{result.sha256} verified{resumed}; files: "
                          f"{', '.join(result.files)}")
                return 0
            rows = list_images(config, db, catalog)
        finally:
            db.dispose()
    except ImageError as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 1
    except SQLAlchemyError as exc:
        print(f"appliance: database error ({type(exc).__name__}: {exc.orig or exc}); is the "
              f"schema current? (appliance db upgrade)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    from appliance.cli import _table  # the CLI's one table format (imported late: no cycle)

    table = [{"name": r["name"], "state": r["state"], "size": _size(r["size"]),
              "sha256": (r["sha256"] or r["declared_sha256"] or "")[:16],
              "source": r["source"]} for r in rows]
    print(_table(table, ["name", "state", "size", "sha256", "source"]))
    return 0
