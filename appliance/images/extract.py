"""Extract the declared members of an artifact (ISO, tar or Debian package) into a directory.

The kind of archive is told from its content, not its name.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from appliance.images.archive import ArchiveError, TarReader, is_deb, is_tar
from appliance.images.iso import IsoError, IsoReader, is_iso


class ExtractError(Exception):
    """Extraction failed; the message names the member and the archive."""


def extract_members(archive: Path, members: Mapping[str, str], out_dir: Path,
                    label: str = "") -> list[str]:
    """Write each ``member`` of ``archive`` to ``out_dir / destination``.

    Returns the destinations (relative paths) in declaration order. Every member is
    extracted or none is usable: on error the caller discards ``out_dir``. ``label``
    names the archive in errors (default: its path).
    """
    if not members:
        return []
    reader: IsoReader | TarReader
    try:
        if is_iso(archive):
            reader = IsoReader(archive, label)
        elif is_deb(archive) or is_tar(archive):
            reader = TarReader(archive, label)
        else:
            raise ExtractError(f"{label or archive}: 'extract' is declared, but this is not an ISO "
                               f"9660 image, a tar archive or a Debian package")
        with reader:
            for member, dest in members.items():
                target = out_dir / dest
                target.parent.mkdir(parents=True, exist_ok=True)
                reader.extract(member, target)
    except (IsoError, ArchiveError) as exc:
        raise ExtractError(str(exc)) from None
    return list(members.values())
