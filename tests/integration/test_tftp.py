"""TFTP in network namespaces with real clients: tftp-hpa's ``tftp``, ``atftp`` and curl.

A server namespace runs ``appliance serve --only tftp`` (in-process engine and, in the
second round, two SO_REUSEPORT worker processes); a client namespace reaches it over a
veth pair (10.250.20.0/24 and 10.250.21.0/24). Every process is stopped by PID and both
namespaces are deleted afterwards.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import netns
from tests.conftest import ApplianceProcess, require_root

SECRET = b"this must never leave the box\n"
FILES = {
    "multi.bin": 100_000,                 # many blocks, last one short
    "exact.bin": 512 * 1468,              # an exact multiple of 512 and of 1468
    "small.bin": 7,
    "empty.bin": 0,
    "sub/nested.bin": 3000,
}


@dataclass
class Env:
    server: netns.Namespace
    client: netns.Namespace
    host: str
    root: Path
    work: Path
    app: ApplianceProcess
    hashes: dict[str, str]

    def client_run(self, *cmd: str, timeout: float = 60):  # type: ignore[no-untyped-def]
        return self.client.exec(list(cmd), check=False, timeout=timeout)

    def counters(self) -> dict[str, int]:
        from appliance.db import Database, read_counters

        db = Database(f"sqlite:///{self.work / 'state' / 'appliance.db'}")
        try:
            return read_counters(db).get("tftp", {})
        finally:
            db.dispose()

    def out(self, name: str) -> Path:
        p = self.work / "out" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.unlink(missing_ok=True)
        return p


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module", params=[1, 2], ids=["in-process", "2-workers"])
def env(request, tmp_path_factory) -> Iterator[Env]:  # type: ignore[no-untyped-def]
    require_root()
    workers = request.param
    net = f"10.250.{19 + workers}"
    work = tmp_path_factory.mktemp(f"tftp-w{workers}")
    root = work / "root"
    hashes = {}
    for name, size in FILES.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(size))
        hashes[name] = sha(p)
    (work / "secret.txt").write_bytes(SECRET)
    os.symlink(work / "secret.txt", root / "escape.txt")
    server = netns.new_namespace()
    client = None
    app = None
    try:
        client = netns.new_namespace()
        netns.veth(server, "tftps0", client, "tftpc0")
        server.ip("addr", "add", f"{net}.1/24", "dev", "tftps0")
        client.ip("addr", "add", f"{net}.2/24", "dev", "tftpc0")
        config = (f'state_dir = "{work / "state"}"\n'
                  f'[tftp]\nbind = "{net}.1"\nroot = "{root}"\nworkers = {workers}\n'
                  f'timeout = 1.0\nretries = 3\nsymlink_targets = ""\n')
        app = ApplianceProcess(server, work, config, only=["tftp"])
        app.start()
        app.wait_log("TFTP serving", timeout=60)
        yield Env(server, client, f"{net}.1", root, work, app, hashes)
    finally:
        if app is not None:
            app.stop()
        if client is not None:
            client.delete()
        server.delete()


@pytest.mark.parametrize("name", sorted(FILES))
def test_tftp_hpa_client_fetches_files(env: Env, name: str) -> None:
    out = env.out(name.replace("/", "_"))
    r = env.client_run("tftp", "-m", "binary", env.host, "-c", "get", name, str(out))
    assert r.returncode == 0, r.stderr
    assert "Error" not in r.stdout + r.stderr
    assert sha(out) == env.hashes[name]


@pytest.mark.parametrize("blksize", [None, 512, 1468, 8192])
@pytest.mark.parametrize("name", ["multi.bin", "exact.bin", "empty.bin"])
def test_atftp_fetches_with_and_without_blksize(env: Env, name: str,
                                                blksize: int | None) -> None:
    out = env.out(f"atftp-{blksize}-{name}")
    cmd = ["atftp"]
    if blksize:
        cmd += ["--option", f"blksize {blksize}"]
    r = env.client_run(*cmd, "-g", "-r", name, "-l", str(out), env.host)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sha(out) == env.hashes[name]


def test_curl_fetches_with_blksize(env: Env) -> None:
    out = env.out("curl-exact.bin")
    r = env.client_run("curl", "-sS", "--max-time", "20", "--tftp-blksize", "1024",
                       f"tftp://{env.host}/exact.bin", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert sha(out) == env.hashes["exact.bin"]


def test_tsize_and_blksize_reported_in_oack(env: Env) -> None:
    out = env.out("trace.bin")
    r = env.client_run("atftp", "--trace", "--option", "tsize 0", "--option", "blksize 1468",
                       "-g", "-r", "multi.bin", "-l", str(out), env.host)
    assert r.returncode == 0, r.stdout + r.stderr
    text = r.stdout + r.stderr
    assert "received OACK <tsize: 100000, blksize: 1468" in text, text
    assert sha(out) == env.hashes["multi.bin"]


@pytest.mark.parametrize("name", ["../secret.txt", "sub/../../secret.txt", "escape.txt",
                                  "ABSOLUTE_SECRET", "ABSOLUTE_INSIDE", "/etc/passwd"])
def test_paths_outside_root_refused(env: Env, name: str) -> None:
    if name == "ABSOLUTE_SECRET":
        name = str(env.work / "secret.txt")
    elif name == "ABSOLUTE_INSIDE":
        name = str(env.root / "small.bin")          # absolute, even though inside the root
    out = env.out("refused-hpa")
    r = env.client_run("tftp", "-m", "binary", env.host, "-c", "get", name, str(out))
    assert "Access violation" in r.stdout + r.stderr
    assert not out.exists() or out.read_bytes() == b""
    out2 = env.out("refused-atftp")
    r = env.client_run("atftp", "-g", "-r", name, "-l", str(out2), env.host)
    assert r.returncode != 0
    assert "Access violation" in r.stdout + r.stderr
    assert not out2.exists() or SECRET not in out2.read_bytes()
    netns.wait_for(lambda: f"refused {name!r}" in env.app.log(), 10, what="refusal logged")


def test_refused_paths_counted(env: Env) -> None:
    # The six names above, each asked by two clients (counters are published every 5 s)
    netns.wait_for(lambda: env.counters().get("refused_paths", 0) >= 12, 20,
                   what=f"refused_paths counter: {env.counters()}")


def test_missing_file_is_file_not_found(env: Env) -> None:
    r = env.client_run("tftp", "-m", "binary", env.host, "-c", "get", "nope.bin",
                       str(env.out("nope")))
    assert "File not found" in r.stdout + r.stderr


def test_write_requests_refused(env: Env) -> None:
    local = env.work / "upload.bin"
    local.write_bytes(b"upload attempt")
    r = env.client_run("tftp", "-m", "binary", env.host, "-c", "put", str(local), "up.bin")
    assert "read-only" in r.stdout + r.stderr
    r = env.client_run("atftp", "-p", "-l", str(local), "-r", "up2.bin", env.host)
    assert r.returncode != 0
    assert not (env.root / "up.bin").exists() and not (env.root / "up2.bin").exists()
    netns.wait_for(lambda: env.counters().get("refused_writes", 0) >= 2, 20,
                   what="refused_writes counter")


GARBAGE_SENDER = r"""
import os, socket, sys
host = sys.argv[1]
datagrams = [
    b"", b"\x00", b"\x00\x01", b"\x00\x01a",
    b"\x00\x01" + b"A" * 600 + b"\x00octet\x00",
    os.urandom(1400), os.urandom(9000),
    b"\x00\x09hello\x00octet\x00", b"\x00\x04\x00\x01", b"\x00\x03\x00\x01data",
    b"\x00\x01name-without-nul", b"\x00\x01only-name\x00", b"\x00\x01\xff\xfe\x00octet\x00",
    b"\x00\x01f\x00octet\x00blksize\x00",
]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for d in datagrams:
    s.sendto(d, (host, 69))
print(len(datagrams))
"""


def test_garbage_dropped_counted_and_server_keeps_serving(env: Env) -> None:
    before = env.counters().get("malformed_dropped", 0)
    r = env.client.exec([sys.executable, "-c", GARBAGE_SENDER, env.host])
    sent = int(r.stdout.strip())
    # Still serving, right after the garbage
    out = env.out("after-garbage.bin")
    r = env.client_run("atftp", "--option", "blksize 1468", "-g", "-r", "multi.bin",
                       "-l", str(out), env.host)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sha(out) == env.hashes["multi.bin"]
    netns.wait_for(lambda: env.counters().get("malformed_dropped", 0) >= before + sent, 20,
                   what=f"malformed_dropped to reach {before + sent}: {env.counters()}")
    assert env.app.proc is not None and env.app.proc.poll() is None
    assert "Traceback" not in env.app.log()


def test_concurrent_clients(env: Env) -> None:
    procs = []
    outs = [env.out(f"conc-{i}.bin") for i in range(20)]
    for i, out in enumerate(outs):
        cmd = ["atftp"] + (["--option", "blksize 1468"] if i % 2 else [])
        procs.append(env.client.popen(
            [*cmd, "-g", "-r", "exact.bin", "-l", str(out), env.host]))
    deadline = time.monotonic() + 60
    for p in procs:
        p.wait(max(1, deadline - time.monotonic()))
        env.client.stop(p)
    for out in outs:
        assert sha(out) == env.hashes["exact.bin"]
