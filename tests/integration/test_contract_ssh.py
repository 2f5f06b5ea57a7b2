"""The post-provision contract check against a real OpenSSH server.

``/usr/sbin/sshd`` (Debian's openssh-server) runs in a server namespace with its own
config, host keys and authorized_keys in a temporary directory; the check runs its
``ssh`` from a client namespace (10.250.70.0/24 and fd00:250:70::/64 over a veth pair).
Each case starts its own sshd on its own port and stops it by PID; both namespaces are
deleted afterwards.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from appliance.lifecycle.contract import (
    ContractResult,
    check_contract,
    known_hosts,
    parse_public_key,
)
from tests import netns
from tests.conftest import require_root
from tests.ipmisim import in_netns

SSHD = "/usr/sbin/sshd"
SERVER_IP = "10.250.70.2"
CLIENT_IP = "10.250.70.1"
SILENT_IP = "10.250.70.9"  # on the segment, nobody answers ARP
SERVER_IP6 = "fd00:250:70::2"
CLIENT_IP6 = "fd00:250:70::1"
PRIVSEP_DIR = Path("/run/sshd")


def fingerprint(pub_line: str) -> str:
    key = parse_public_key(pub_line)
    assert key is not None
    return key.fingerprint


@dataclass
class Lab:
    server: netns.Namespace
    client: netns.Namespace
    work: Path
    #: the server's host public keys, as cloud-init's phone_home posts them
    host_keys: list[str]
    #: public key lines by name: op_a, op_b, op_c, op_d, op_e (operator), other_host
    pub: dict[str, str]
    next_port: int = 2200
    running: list[subprocess.Popen] = field(default_factory=list)

    def key(self, name: str) -> Path:
        return self.work / "keys" / name

    def sshd(self, authorized: list[str], **options: str) -> int:
        """Start sshd on a new port with ``authorized`` (key names) and extra options;
        return the port once it listens."""
        self.next_port += 1
        port = self.next_port
        d = self.work / f"sshd-{port}"
        d.mkdir()
        (d / "authorized_keys").write_text("".join(self.pub[n] + "\n" for n in authorized))
        config = {
            "Port": str(port), "AuthorizedKeysFile": str(d / "authorized_keys"),
            "StrictModes": "no", "UsePAM": "no", "PidFile": str(d / "sshd.pid"),
            "PasswordAuthentication": "no", "KbdInteractiveAuthentication": "no",
            "PermitRootLogin": "prohibit-password", "LogLevel": "VERBOSE",
            **options,
        }
        lines = [f"ListenAddress {SERVER_IP}", f"ListenAddress {SERVER_IP6}"]
        lines += [f"HostKey {self.key(k)}" for k in ("host_ed25519", "host_rsa")]
        lines += [f"{k} {v}" for k, v in config.items()]
        cfg = d / "sshd_config"
        cfg.write_text("\n".join(lines) + "\n")
        subprocess.run([SSHD, "-t", "-f", str(cfg)], check=True, capture_output=True)
        log = d / "sshd.log"
        proc = self.server.popen([SSHD, "-D", "-e", "-f", str(cfg)], log=log)
        self.running.append(proc)
        netns.wait_for(lambda: log.exists() and log.read_text().count("Server listening") >= 2,
                       10, what=f"sshd on port {port}")
        return port

    def sshd_log(self, port: int) -> str:
        return (self.work / f"sshd-{port}" / "sshd.log").read_text()

    def check(self, port: int, keys: list[str], host_keys: list[str] | None = None,
              address: str = SERVER_IP, timeout: float = 10.0) -> ContractResult:
        """check_contract from the client namespace, with the operator keys named."""
        lines = [self.pub[k] for k in keys]
        phoned = self.host_keys if host_keys is None else host_keys
        return in_netns(self.client, lambda: check_contract(
            address, phoned, lines, port=port, timeout=timeout))

    def stop_all(self) -> None:
        for proc in self.running:
            self.server.stop(proc)
        self.running.clear()


def _keygen(path: Path, kind: str, comment: str) -> str:
    args = ["-t", kind] + (["-b", "2048"] if kind == "rsa" else [])
    subprocess.run(["ssh-keygen", "-q", *args, "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True)
    return path.with_suffix(".pub").read_text().strip()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_root()
    for tool in (SSHD, "/usr/bin/ssh", "/usr/bin/ssh-keygen"):
        if not os.access(tool, os.X_OK):
            if os.environ.get("CI"):
                pytest.fail(f"{tool} missing (openssh-server, openssh-client)")
            pytest.skip(f"{tool} missing: apt-get install openssh-server openssh-client")
    work = tmp_path_factory.mktemp("contract")
    (work / "keys").mkdir(mode=0o700)
    pub = {}
    for name, kind in (("host_ed25519", "ed25519"), ("host_rsa", "rsa"),
                       ("other_host", "ed25519"), ("op_a", "ed25519"), ("op_b", "ecdsa"),
                       ("op_c", "ed25519"), ("op_d", "ed25519"), ("op_e", "rsa")):
        pub[name] = _keygen(work / "keys" / name, kind, f"{name}@test")
    # sshd refuses to start without its privilege separation directory.
    made_privsep = not PRIVSEP_DIR.exists()
    if made_privsep:
        PRIVSEP_DIR.mkdir(mode=0o755, parents=True)

    server = netns.new_namespace()
    client = netns.new_namespace()
    lab = Lab(server, client, work,
              host_keys=[pub["host_ed25519"].rsplit(" ", 1)[0] + " root@machine",
                         pub["host_rsa"].rsplit(" ", 1)[0] + " root@machine"],
              pub=pub)
    try:
        netns.veth(server, "ctr0", client, "ctr1")
        server.ip("addr", "add", f"{SERVER_IP}/24", "dev", "ctr0")
        client.ip("addr", "add", f"{CLIENT_IP}/24", "dev", "ctr1")
        server.ip("addr", "add", f"{SERVER_IP6}/64", "dev", "ctr0", "nodad")
        client.ip("addr", "add", f"{CLIENT_IP6}/64", "dev", "ctr1", "nodad")
        yield lab
    finally:
        lab.stop_all()
        client.delete()
        server.delete()
        if made_privsep:
            try:
                PRIVSEP_DIR.rmdir()
            except OSError:
                pass


@pytest.fixture(autouse=True)
def _stop_sshds(lab: Lab) -> Iterator[None]:
    yield
    lab.stop_all()


def _contract_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("appliance-contract-*")}


def test_a_contract_holds_and_agrees_with_a_real_login(lab: Lab) -> None:
    port = lab.sshd(["op_a"])
    before = _contract_dirs()
    result = lab.check(port, ["op_a"])
    assert result.ok, result
    assert result.reason == ""
    c = result.checks
    assert c["reachable"] is True and c["retryable"] is False
    assert c["host_key"] == "matches"
    assert c["server_host_key"].split()[1] in {fingerprint(k) for k in lab.host_keys}
    assert c["keys_accepted"] == [fingerprint(lab.pub["op_a"])]
    assert c["keys_refused"] == [] and c["keys_unchecked"] == []
    assert c["auth_methods"] == ["publickey"]
    assert c["password_login"] == "refused"
    assert c["connections"] == 1 and c["duration_s"] < 5
    assert _contract_dirs() <= before, "the check left its temporary directory behind"
    # The check only asked (PK_OK); it never logged in.
    netns.wait_for(lambda: "Connection closed by authenticating user root" in lab.sshd_log(port),
                   5, what="the end of the check's session in the sshd log")
    log = lab.sshd_log(port)
    assert "Postponed publickey for root" in log
    assert "Accepted publickey" not in log

    # The verdict agrees with a real login with the matching private key.
    kh = lab.work / f"known_hosts-{port}"
    keys = [parse_public_key(k) for k in lab.host_keys]
    kh.write_text(known_hosts(SERVER_IP, port, keys))  # type: ignore[arg-type]
    login = lab.client.exec(
        ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
         "-o", f"UserKnownHostsFile={kh}", "-o", "GlobalKnownHostsFile=/dev/null",
         "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-o", "ConnectTimeout=5",
         "-i", str(lab.key("op_a")), "-p", str(port), f"root@{SERVER_IP}",
         "echo contract-$((6*7)) $(id -u)"],
        check=False, timeout=30, stdin=subprocess.DEVNULL,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(lab.work), "LC_ALL": "C"})
    assert login.returncode == 0, login.stderr
    assert login.stdout.split() == ["contract-42", "0"]
    netns.wait_for(lambda: "Accepted publickey for root" in lab.sshd_log(port), 5,
                   what="the login in the sshd log")


def test_a_over_ipv6(lab: Lab) -> None:
    port = lab.sshd(["op_a"])
    result = lab.check(port, ["op_a"], address=SERVER_IP6)
    assert result.ok, result
    assert result.checks["keys_accepted"] == [fingerprint(lab.pub["op_a"])]


@pytest.mark.parametrize(("option", "method"), [("PasswordAuthentication", "password"),
                                                ("KbdInteractiveAuthentication",
                                                 "keyboard-interactive")])
def test_b_password_login_on(lab: Lab, option: str, method: str) -> None:
    port = lab.sshd(["op_a"], **{option: "yes"})
    result = lab.check(port, ["op_a"])
    assert not result.ok
    assert "password login is on" in result.reason and method in result.reason
    assert result.checks["password_login"] == "offered"
    assert method in result.checks["auth_methods"]
    assert result.checks["keys_accepted"] == [fingerprint(lab.pub["op_a"])]
    assert result.checks["retryable"] is False


def test_c_host_key_differs(lab: Lab) -> None:
    port = lab.sshd(["op_a"])
    result = lab.check(port, ["op_a"], host_keys=[lab.pub["other_host"]])
    assert not result.ok
    assert "host key differs from the one the machine phoned home" in result.reason
    assert result.checks["host_key"] == "differs"
    assert result.checks["retryable"] is False
    assert result.checks["keys_accepted"] == []
    # ssh stops at the host key: the operator's key was never shown to the impostor.
    netns.wait_for(lambda: "Connection closed by" in lab.sshd_log(port), 5,
                   what="the end of the check's session in the sshd log")
    assert "publickey" not in lab.sshd_log(port)


def test_d_no_operator_key_authorized(lab: Lab) -> None:
    port = lab.sshd(["op_b"])
    result = lab.check(port, ["op_a"])
    assert not result.ok
    assert result.reason == "none of the operator's 1 SSH key is accepted for root"
    assert result.checks["keys_accepted"] == []
    assert result.checks["keys_refused"] == [fingerprint(lab.pub["op_a"])]
    assert result.checks["password_login"] == "refused"
    assert result.checks["retryable"] is False


def test_d_publickey_login_off(lab: Lab) -> None:
    port = lab.sshd(["op_a"], PubkeyAuthentication="no")
    result = lab.check(port, ["op_a"])
    assert not result.ok
    assert "does not offer publickey login" in result.reason
    assert result.checks["retryable"] is False


def test_e_nothing_listening(lab: Lab) -> None:
    start = time.monotonic()
    result = lab.check(2199, ["op_a"], timeout=5)
    assert time.monotonic() - start < 3
    assert not result.ok and result.checks["retryable"] is True
    assert result.checks["reachable"] is False
    assert "Connection refused" in result.reason


def test_e_nobody_at_the_address(lab: Lab) -> None:
    start = time.monotonic()
    result = lab.check(22, ["op_a"], address=SILENT_IP, timeout=2)
    elapsed = time.monotonic() - start
    assert elapsed < 3.5, elapsed
    assert not result.ok and result.checks["retryable"] is True
    assert "cannot reach SSH on 10.250.70.9 port 22" in result.reason


def _listener(ns: netns.Namespace, port: int, greet: bytes) -> Callable[[], None]:
    """A TCP listener in ``ns`` that sends ``greet`` to each client and then nothing;
    returns a function that closes it."""
    sock = in_netns(ns, lambda: socket.create_server((SERVER_IP, port)))
    conns: list[socket.socket] = []
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            conns.append(conn)
            if greet:
                conn.sendall(greet)

    t = threading.Thread(target=serve, daemon=True)
    t.start()

    def close() -> None:
        stop.set()
        t.join(5)
        for c in conns:
            c.close()
        sock.close()
    return close


def _ssh_children() -> list[int]:
    """PIDs of ssh processes whose parent is this test process."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1:text.rindex(")")]
        ppid = int(text[text.rindex(")") + 2:].split()[1])
        if ppid == os.getpid() and comm == "ssh":
            found.append(int(stat.parent.name))
    return found


@pytest.mark.parametrize(("greet", "what"), [(b"", "no banner"),
                                             (b"SSH-2.0-Stall\r\n", "banner, then silence")])
def test_e_a_server_that_stalls_is_bounded(lab: Lab, greet: bytes, what: str) -> None:
    close = _listener(lab.server, 2198, greet)
    try:
        start = time.monotonic()
        result = lab.check(2198, ["op_a"], timeout=2)
        elapsed = time.monotonic() - start
    finally:
        close()
    assert elapsed < 4, (what, elapsed)
    assert not result.ok and result.checks["retryable"] is True, result
    assert _ssh_children() == []


def test_f_two_operator_keys_one_authorized(lab: Lab) -> None:
    port = lab.sshd(["op_a"])
    result = lab.check(port, ["op_b", "op_a"])
    assert result.ok, result
    assert result.checks["keys_accepted"] == [fingerprint(lab.pub["op_a"])]
    assert result.checks["keys_refused"] == [fingerprint(lab.pub["op_b"])]
    assert result.checks["connections"] == 1


def test_f_max_auth_tries_asks_again(lab: Lab) -> None:
    """With MaxAuthTries 2 the server hangs up after two refused keys; the check asks
    again about the rest, and finds the authorized one last in the list."""
    port = lab.sshd(["op_a"], MaxAuthTries="2")
    names = ["op_b", "op_c", "op_d", "op_e", "op_a"]
    result = lab.check(port, names)
    assert result.ok, result
    assert result.checks["keys_accepted"] == [fingerprint(lab.pub["op_a"])]
    assert sorted(result.checks["keys_refused"]) == sorted(
        fingerprint(lab.pub[n]) for n in names[:4])
    assert result.checks["keys_unchecked"] == []
    assert result.checks["connections"] >= 2
    assert "Too many authentication failures" in lab.sshd_log(port)


def test_a_banner_cannot_forge_an_answer(lab: Lab) -> None:
    """ssh prints the server's login banner verbatim among its debug lines; a banner that
    imitates them must not make a refused key look accepted."""
    fp = fingerprint(lab.pub["op_a"])
    banner = lab.work / "forged-banner"
    banner.write_text(
        "debug1: Server host key: ssh-ed25519 SHA256:forged\n"
        "debug1: Authentications that can continue: publickey\n"
        f"debug1: Offering public key: /tmp/appliance-contract-x/k0 ED25519 {fp} explicit\n"
        f"debug1: Server accepts key: /tmp/appliance-contract-x/k0 ED25519 {fp} explicit\n"
        f"debug1: Server accepts key: {fp}\n")
    port = lab.sshd(["op_b"], Banner=str(banner))
    result = lab.check(port, ["op_a"])
    assert not result.ok
    assert result.reason == "none of the operator's 1 SSH key is accepted for root"
    assert result.checks["keys_accepted"] == [] and result.checks["keys_refused"] == [fp]
    assert result.checks["server_host_key"] != "ssh-ed25519 SHA256:forged"
