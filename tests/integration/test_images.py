"""The image store against a real HTTP server on 127.0.0.1 and real ISO images.

The server is a small http.server with Range support and switches to misbehave: cut a
response short, ignore Range. ISOs are built with xorriso (Rock Ridge + Joliet, as
installer ISOs are). Nothing is fetched from the internet.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from sqlalchemy import select

from appliance.config import Config
from appliance.db import Database
from appliance.images.spec import ArtifactSpec, parse_artifact
from appliance.images.store import ImageError, import_artifact
from appliance.models import Image

REPO = Path(__file__).resolve().parents[2]


class FileServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.files: dict[str, bytes] = {}
        #: (path, Range header or None) of every GET.
        self.requests: list[tuple[str, str | None]] = []
        #: Send only this many body bytes on the next GET, then close the connection.
        self.cut_next_after: int | None = None
        self.ignore_range = False

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: FileServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        srv = self.server
        range_header = self.headers.get("Range")
        srv.requests.append((self.path, range_header))
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        if match and not srv.ignore_range:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        cut, srv.cut_next_after = srv.cut_next_after, None
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server() -> Iterator[FileServer]:
    srv = FileServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config(state_dir=str(tmp_path / "state"))


@pytest.fixture
def db(config: Config) -> Iterator[Database]:
    database = Database(config.effective_database_url)
    database.migrate()
    yield database
    database.dispose()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def url_spec(server: FileServer, name: str, url_path: str, data: bytes,
             **kw: object) -> ArtifactSpec:
    server.files[url_path] = data
    return parse_artifact({"name": name, "source": server.base + url_path, "sha256": sha(data),
                           **kw}, "test")


def image_rows(db: Database) -> dict[str, Image]:
    with db.session() as s:
        return {r.name: r for r in s.scalars(select(Image))}


def test_full_download(server: FileServer, config: Config, database_url: str) -> None:
    db = Database(database_url)
    db.migrate()
    try:
        data = os.urandom(3 * 1024 * 1024 + 17)
        spec = url_spec(server, "disk", "/os/disk.raw", data, size=len(data))
        result = import_artifact(config, db, spec)
        assert (result.status, result.size, result.resumed_from) == ("imported", len(data), 0)
        assert (config.images_dir / "disk/disk.raw").read_bytes() == data
        assert server.requests == [("/os/disk.raw", None)]
        assert image_rows(db)["disk"].sha256 == sha(data)
        assert import_artifact(config, db, spec).status == "already imported"
        assert len(server.requests) == 1, "an imported artifact is not fetched again"
    finally:
        db.dispose()


def test_interrupted_download_resumes_with_range(server: FileServer, config: Config,
                                                 db: Database) -> None:
    data = os.urandom(2 * 1024 * 1024 + 5)
    cut = 700_001
    spec = url_spec(server, "iso", "/big.iso", data)
    server.cut_next_after = cut
    with pytest.raises(ImageError) as err:
        import_artifact(config, db, spec)
    assert f"download interrupted after {cut} of {len(data)} bytes" in str(err.value)
    assert "run the import again to resume" in str(err.value)
    part = config.images_dir / "iso/big.iso.part"
    assert part.stat().st_size == cut
    assert not (config.images_dir / "iso/big.iso").exists()
    assert image_rows(db) == {}

    result = import_artifact(config, db, spec)
    assert server.requests[-1] == ("/big.iso", f"bytes={cut}-")
    assert result.resumed_from == cut
    assert (config.images_dir / "iso/big.iso").read_bytes() == data
    assert not part.exists()
    assert image_rows(db)["iso"].size == len(data)


def test_server_ignoring_range_restarts_cleanly(server: FileServer, config: Config,
                                                db: Database) -> None:
    data = os.urandom(1024 * 1024)
    spec = url_spec(server, "img", "/img.bin", data)
    part = config.images_dir / "img/img.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\xff" * 1000)  # stale bytes that must not survive
    server.ignore_range = True
    result = import_artifact(config, db, spec)
    assert server.requests == [("/img.bin", "bytes=1000-")]
    assert result.resumed_from == 0
    assert (config.images_dir / "img/img.bin").read_bytes() == data


def test_complete_part_is_verified_without_refetch(server: FileServer, config: Config,
                                                   db: Database) -> None:
    data = os.urandom(5000)
    spec = url_spec(server, "k", "/k", data)
    part = config.images_dir / "k/k.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data)
    result = import_artifact(config, db, spec)
    assert server.requests == [("/k", "bytes=5000-")]  # answered 416 */5000: complete
    assert result.resumed_from == 5000
    assert (config.images_dir / "k/k").read_bytes() == data


def test_wrong_sha256_keeps_previous_good_import(server: FileServer, config: Config,
                                                 db: Database) -> None:
    good = os.urandom(20_000)
    import_artifact(config, db, url_spec(server, "os", "/v1/os.img", good,
                                         path="os/os.img"))
    server.files["/v2/os.img"] = os.urandom(20_000)
    declared = "e" * 64
    bad = parse_artifact({"name": "os", "source": server.base + "/v2/os.img",
                          "sha256": declared, "path": "os/os.img"}, "test")
    with pytest.raises(ImageError) as err:
        import_artifact(config, db, bad)
    got = sha(server.files["/v2/os.img"])
    assert str(err.value).startswith(f"artifact os from {server.base}/v2/os.img: sha256 "
                                     f"mismatch: expected {declared}, got {got}")
    assert (config.images_dir / "os/os.img").read_bytes() == good
    assert not (config.images_dir / "os/os.img.part").exists()
    row = image_rows(db)["os"]
    assert (row.sha256, row.source) == (sha(good), server.base + "/v1/os.img")


def test_http_errors_are_clear(server: FileServer, config: Config, db: Database) -> None:
    spec = parse_artifact({"name": "gone", "source": server.base + "/gone.iso",
                           "sha256": "a" * 64}, "test")
    with pytest.raises(ImageError, match=r"artifact gone from http://127\.0\.0\.1:\d+/gone"
                                         r"\.iso: HTTP 404"):
        import_artifact(config, db, spec)
    spec = url_spec(server, "sized", "/sized", b"x" * 100, size=50)
    with pytest.raises(ImageError, match="the server offers 100 bytes, the declaration says "
                                         "size 50"):
        import_artifact(config, db, spec)
    assert not (config.images_dir / "sized/sized.part").exists()
    dead = parse_artifact({"name": "dead", "source": "http://127.0.0.1:9/x",
                           "sha256": "a" * 64}, "test")
    with pytest.raises(ImageError, match="artifact dead from http://127.0.0.1:9/x: "):
        import_artifact(config, db, dead)


def build_iso(tmp_path: Path, files: dict[str, bytes], *flags: str) -> bytes:
    xorriso = shutil.which("xorriso")
    if xorriso is None:
        if os.environ.get("CI"):
            pytest.fail("xorriso is not installed (Debian package xorriso)")
        pytest.skip("xorriso not installed (Debian package xorriso)")
    tree = tmp_path / "isotree"
    for rel, data in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
    out = tmp_path / "test.iso"
    subprocess.run([xorriso, "-as", "mkisofs", *flags, "-V", "TEST", "-o", str(out),
                    str(tree)], check=True, capture_output=True, timeout=60)
    return out.read_bytes()


@pytest.mark.parametrize("flags", [["-R", "-J"], ["-R"]], ids=["rr+joliet", "rr-only"])
def test_iso_import_extracts_rock_ridge_members(server: FileServer, config: Config,
                                                db: Database, tmp_path: Path,
                                                flags: list[str]) -> None:
    members = {"casper/vmlinuz": os.urandom(40_000), "casper/initrd": os.urandom(90_001),
               ".treeinfo": b"[general]\nfamily = Test\n",
               "images/pxeboot/initrd.img": os.urandom(3000)}
    iso = build_iso(tmp_path, members, *flags)
    extract = {"casper/vmlinuz": "ubuntu/vmlinuz", "casper/initrd": "ubuntu/initrd",
               ".treeinfo": "ubuntu/.treeinfo",
               "images/pxeboot/initrd.img": "ubuntu/pxe/initrd.img"}
    spec = url_spec(server, "ubuntu-iso", "/ubuntu.iso", iso, size=len(iso), extract=extract)
    result = import_artifact(config, db, spec)
    assert result.files == ["ubuntu-iso/ubuntu.iso", *extract.values()]
    for member, dest in extract.items():
        assert (config.images_dir / dest).read_bytes() == members[member], member
    assert image_rows(db)["ubuntu-iso"].files == result.files


@pytest.mark.parametrize("flags", [["-J"], []], ids=["joliet", "plain-iso9660"])
def test_iso_without_rock_ridge(server: FileServer, config: Config, db: Database,
                                tmp_path: Path, flags: list[str]) -> None:
    kernel = os.urandom(10_000)
    iso = build_iso(tmp_path, {"casper/vmlinuz": kernel}, *flags)
    spec = url_spec(server, "iso", "/x.iso", iso, extract={"casper/vmlinuz": "x/vmlinuz"})
    import_artifact(config, db, spec)
    assert (config.images_dir / "x/vmlinuz").read_bytes() == kernel


def test_iso_missing_member(server: FileServer, config: Config, db: Database,
                            tmp_path: Path) -> None:
    iso = build_iso(tmp_path, {"casper/vmlinuz": b"k" * 100}, "-R", "-J")
    spec = url_spec(server, "iso", "/u.iso", iso,
                    extract={"casper/vmlinuz": "u/vmlinuz", "casper/initrd": "u/initrd"})
    with pytest.raises(ImageError) as err:
        import_artifact(config, db, spec)
    assert str(err.value).startswith(f"artifact iso from {server.base}/u.iso: member "
                                     f"'casper/initrd' not found in the ISO")
    assert not (config.images_dir / "u").exists(), "no member is put in place"
    assert not (config.images_dir / "iso/u.iso").exists()
    assert image_rows(db) == {}
    # The verified download is kept: after the declaration is fixed, no new download.
    fixed = url_spec(server, "iso", "/u.iso", iso, extract={"casper/vmlinuz": "u/vmlinuz"})
    requests = len(server.requests)
    import_artifact(config, db, fixed)
    assert server.requests[requests:] == [("/u.iso", f"bytes={len(iso)}-")]
    assert (config.images_dir / "u/vmlinuz").read_bytes() == b"k" * 100


HARNESS = """
import argparse, sys
from appliance.config import load_config
from appliance.images import commands
parser = argparse.ArgumentParser(prog="appliance")
commands.register(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args, load_config()))
"""


def test_cli_import_and_list_subprocess(server: FileServer, config: Config, db: Database,
                                        tmp_path: Path) -> None:
    """The command as an operator runs it (until cli.py wires it, through a harness)."""
    harness = tmp_path / "harness.py"
    harness.write_text(HARNESS)
    toml = tmp_path / "appliance.toml"
    toml.write_text(f'state_dir = "{config.state_dir}"\n')
    env = {**os.environ, "APPLIANCE_CONFIG": str(toml), "PYTHONPATH": str(REPO)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(harness), "images", *args], env=env,
                              capture_output=True, text=True, timeout=60)

    data = os.urandom(300_000)
    server.files["/tool.img"] = data
    url = server.base + "/tool.img"
    refused = cli("import", url)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        f"appliance: {url}: importing a path or URL needs --sha256 HEX: a file with no "
        f"declared checksum is never trusted"]
    bad = cli("import", url, "--sha256", "0" * 64)
    assert bad.returncode == 1
    assert f"sha256 mismatch: expected {'0' * 64}, got {sha(data)}" in bad.stderr
    ok = cli("import", url, "--sha256", sha(data), "--name", "tool")
    assert ok.returncode == 0, ok.stderr
    assert f"artifact tool imported: {len(data)} bytes, sha256 {sha(data)} verified" in ok.stdout
    assert "tool: " in ok.stderr  # progress goes to stderr, plain lines when not a TTY
    again = cli("import", url, "--sha256", sha(data), "--name", "tool")
    assert "already imported" in again.stdout
    listed = cli("list", "--json")
    assert listed.returncode == 0, listed.stderr
    row = {r["name"]: r for r in json.loads(listed.stdout)}["tool"]
    assert (row["state"], row["sha256"], row["size"]) == ("ok", sha(data), len(data))
    assert (config.images_dir / "tool/tool.img").read_bytes() == data
