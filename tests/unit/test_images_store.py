"""The image store with local files: verification, idempotence, failure leaves no trace."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from sqlalchemy import select

from appliance.config import Config
from appliance.db import Database
from appliance.images import commands
from appliance.images.spec import ArtifactSpec, parse_artifact
from appliance.images.store import ImageError, import_artifact, import_path_or_url, list_images
from appliance.models import Image


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config(state_dir=str(tmp_path / "state"))


@pytest.fixture
def db(config: Config):  # type: ignore[no-untyped-def]
    database = Database(config.effective_database_url)
    database.migrate()
    yield database
    database.dispose()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def source_file(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / "src" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_spec(name: str, source: Path, digest: str, **kw: object) -> ArtifactSpec:
    return parse_artifact({"name": name, "source": str(source), "sha256": digest, **kw}, "test")


def rows(db: Database) -> list[Image]:
    with db.session() as s:
        return list(s.scalars(select(Image)))


def test_local_import_verifies_and_records(tmp_path: Path, config: Config,
                                           db: Database) -> None:
    data = os.urandom(70_000)
    src = source_file(tmp_path, "disk.img", data)
    result = import_artifact(config, db, make_spec("disk", src, sha(data), size=len(data)))
    assert result.status == "imported"
    stored = config.images_dir / "disk" / "disk.img"
    assert stored.read_bytes() == data
    assert src.read_bytes() == data, "the source is never moved or changed"
    [row] = rows(db)
    assert (row.name, row.sha256, row.size, row.files) == ("disk", sha(data), len(data),
                                                           ["disk/disk.img"])
    assert not list(config.images_dir.rglob("*.part"))


def test_sha256_mismatch_is_error_and_nothing_kept(tmp_path: Path, config: Config,
                                                   db: Database) -> None:
    data = b"not what was declared"
    src = source_file(tmp_path, "disk.img", data)
    wrong = "0" * 64
    with pytest.raises(ImageError) as err:
        import_artifact(config, db, make_spec("disk", src, wrong))
    assert str(err.value).startswith(
        f"artifact disk from {src}: sha256 mismatch: expected {wrong}, got {sha(data)}")
    assert [p for p in config.images_dir.rglob("*") if p.is_file()
            and ".locks" not in p.parts] == []
    assert rows(db) == []
    assert src.read_bytes() == data


def test_declared_size_mismatch(tmp_path: Path, config: Config, db: Database) -> None:
    data = b"x" * 100
    src = source_file(tmp_path, "a.bin", data)
    with pytest.raises(ImageError, match="size mismatch: declared 99 bytes, got 100"):
        import_artifact(config, db, make_spec("a", src, sha(data), size=99))
    assert not (config.images_dir / "a" / "a.bin").exists()
    assert rows(db) == []


def test_reimport_is_idempotent(tmp_path: Path, config: Config, db: Database) -> None:
    data = os.urandom(1000)
    spec = make_spec("disk", source_file(tmp_path, "disk.img", data), sha(data))
    import_artifact(config, db, spec)
    stored = config.images_dir / "disk" / "disk.img"
    before = stored.stat().st_ino, rows(db)[0].imported_at
    again = import_artifact(config, db, spec)
    assert again.status == "already imported"
    assert (stored.stat().st_ino, rows(db)[0].imported_at) == before
    # A file gone from disk is noticed and the import done again.
    stored.unlink()
    assert list_images(config, db, {"disk": spec})[0]["state"] == "missing files"
    assert import_artifact(config, db, spec).status == "imported"
    assert stored.read_bytes() == data


def test_failed_update_leaves_good_version(tmp_path: Path, config: Config,
                                           db: Database) -> None:
    good = os.urandom(500)
    import_artifact(config, db, make_spec("disk", source_file(tmp_path, "disk.img", good),
                                          sha(good)))
    bad_src = source_file(tmp_path / "new", "disk.img", os.urandom(500))
    with pytest.raises(ImageError, match="sha256 mismatch"):
        import_artifact(config, db, make_spec("disk", bad_src, "1" * 64))
    assert (config.images_dir / "disk" / "disk.img").read_bytes() == good
    [row] = rows(db)
    assert row.sha256 == sha(good) and row.source == str(tmp_path / "src" / "disk.img")


def tar_with(path: Path, members: dict[str, bytes], links: dict[str, tuple[str, bytes]]) -> None:
    """``links``: name -> (target, SYMTYPE or LNKTYPE)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, (target, kind) in links.items():
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = target
            tar.addfile(info)


def test_tar_extraction_and_links_inside(tmp_path: Path, config: Config,
                                         db: Database) -> None:
    kernel, initrd = os.urandom(3000), os.urandom(5000)
    archive = tmp_path / "netboot.tar.gz"
    tar_with(archive, {"./debian-installer/amd64/linux": kernel,
                       "debian-installer/amd64/initrd.gz": initrd},
             {"linux": ("debian-installer/amd64/linux", tarfile.SYMTYPE),
              "initrd-hard": ("debian-installer/amd64/initrd.gz", tarfile.LNKTYPE)})
    spec = make_spec("netboot", archive, sha(archive.read_bytes()),
                     extract={"linux": "d12/linux", "./initrd-hard": "d12/initrd.gz"})
    result = import_artifact(config, db, spec)
    assert result.files == ["netboot/netboot.tar.gz", "d12/linux", "d12/initrd.gz"]
    assert (config.images_dir / "d12/linux").read_bytes() == kernel
    assert (config.images_dir / "d12/initrd.gz").read_bytes() == initrd


@pytest.mark.parametrize(("member", "needle"), [
    ("../etc/passwd", "names must be relative, without '..'"),
    ("/etc/passwd", "names must be relative"),
    ("escape", "is a link to '../../etc/passwd', outside the archive; refused"),
    ("absolute", "is a link to '/etc/passwd', outside the archive; refused"),
    ("dir", "is not a regular file"),
    ("nothere", "member 'nothere' not found in the archive"),
])
def test_tar_unsafe_or_missing_member_refused(tmp_path: Path, config: Config, db: Database,
                                              member: str, needle: str) -> None:
    archive = tmp_path / "bad.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        d = tarfile.TarInfo("dir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
    tar_with(tmp_path / "links.tar.gz", {"ok": b"fine"},
             {"escape": ("../../etc/passwd", tarfile.SYMTYPE),
              "absolute": ("/etc/passwd", tarfile.SYMTYPE)})
    if member in ("dir",):
        path = archive
    else:
        path = tmp_path / "links.tar.gz"
    spec = make_spec("arch", path, sha(path.read_bytes()), extract={member: "out/file"})
    with pytest.raises(ImageError) as err:
        import_artifact(config, db, spec)
    assert needle in str(err.value)
    assert str(path) in str(err.value)
    assert not (config.images_dir / "out").exists()
    assert not (config.images_dir / "arch").exists() or not any(
        (config.images_dir / "arch").iterdir())
    assert rows(db) == []
    assert not list(config.images_dir.glob(".staging-*"))


def ar_archive(members: dict[str, bytes]) -> bytes:
    out = bytearray(b"!<arch>\n")
    for name, data in members.items():
        header = (f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}").encode() + b"`\n"
        out += header + data + (b"\n" if len(data) % 2 else b"")
    return bytes(out)


def test_deb_data_member_extracted(tmp_path: Path, config: Config, db: Database) -> None:
    efi = os.urandom(2001)
    data_tar = io.BytesIO()
    with tarfile.open(fileobj=data_tar, mode="w:xz") as tar:
        info = tarfile.TarInfo("./boot/memtest.efi")
        info.size = len(efi)
        tar.addfile(info, io.BytesIO(efi))
    control = io.BytesIO()
    with tarfile.open(fileobj=control, mode="w:xz"):
        pass
    deb = tmp_path / "tool_1.0_amd64.deb"
    deb.write_bytes(ar_archive({"debian-binary": b"2.0\n", "control.tar.xz": control.getvalue(),
                                "data.tar.xz": data_tar.getvalue()}))
    spec = make_spec("tool", deb, sha(deb.read_bytes()),
                     extract={"boot/memtest.efi": "tool/memtest.efi"})
    import_artifact(config, db, spec)
    assert (config.images_dir / "tool/memtest.efi").read_bytes() == efi


def test_extract_from_plain_file_is_clear(tmp_path: Path, config: Config,
                                          db: Database) -> None:
    src = source_file(tmp_path, "kernel", b"a kernel, not an archive\n" * 200)
    spec = make_spec("k", src, sha(src.read_bytes()), extract={"a": "k/a"})
    with pytest.raises(ImageError, match="not an ISO 9660 image, a tar archive or a Debian"):
        import_artifact(config, db, spec)


def test_path_import_needs_sha256_and_guards_names(tmp_path: Path, config: Config,
                                                   db: Database) -> None:
    data = os.urandom(64)
    src = source_file(tmp_path, "custom.raw", data)
    with pytest.raises(ImageError, match="needs --sha256 HEX: a file with no declared "
                                         "checksum is never trusted"):
        import_path_or_url(config, db, str(src), None, None, {})
    with pytest.raises(ImageError, match="no such file"):
        import_path_or_url(config, db, str(tmp_path / "absent.raw"), "a" * 64, None, {})
    declared = make_spec("custom.raw", tmp_path / "elsewhere", "b" * 64)
    with pytest.raises(ImageError, match="declared in the catalog"):
        import_path_or_url(config, db, str(src), sha(data), None, {"custom.raw": declared})
    result = import_path_or_url(config, db, str(src), "SHA256:" + sha(data).upper(), None, {})
    assert (result.name, result.files) == ("custom.raw", ["custom.raw/custom.raw"])
    with pytest.raises(ImageError, match="give a valid name with --name"):
        import_path_or_url(config, db, str(source_file(tmp_path, "bad name", data)),
                           sha(data), None, {})


def run_cli(config: Config, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="appliance")
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args, config)


def test_commands_list_and_errors(tmp_path: Path, config: Config, db: Database,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    data = os.urandom(10)
    src = source_file(tmp_path, "x.img", data)
    assert run_cli(config, "images", "import", str(src)) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("appliance: ")
    assert "--sha256" in err
    assert run_cli(config, "images", "import", "no-such-artifact") == 1
    assert "no-such-artifact: no such artifact" in capsys.readouterr().err
    assert run_cli(config, "images", "import", "-q", str(src), "--sha256", sha(data),
                   "--name", "x") == 0
    assert "artifact x imported" in capsys.readouterr().out
    assert run_cli(config, "images", "list", "--json") == 0
    listed = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert listed["x"]["state"] == "ok"
    assert listed["x"]["files"] == [{"path": "x/x.img", "present": True}]
    assert "memtest86plus" in listed and listed["memtest86plus"]["state"] == "not imported"
    assert run_cli(config, "images", "list") == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["NAME", "STATE", "SIZE", "SHA256", "SOURCE"]
