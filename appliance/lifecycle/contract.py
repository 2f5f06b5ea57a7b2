"""The appliance's own check of the post-provision SSH contract (DESIGN.md).

After a machine phoned home its SSH host public keys, the appliance confirms over SSH,
holding no private key of the operator, that

1. the machine answers SSH on its address and presents one of the host keys it phoned
   home (anything else is an impostor or a reused address);
2. at least one of the operator's public keys would be accepted for the login user: the
   publickey "query" of RFC 4252 section 7 (a USERAUTH_REQUEST without signature, which
   the server answers with USERAUTH_PK_OK when it would accept the key);
3. password login is off: the server's "authentications that can continue" contain
   neither ``password`` nor ``keyboard-interactive``.

It drives Debian's OpenSSH client (``/usr/bin/ssh``, package openssh-client) with ``-v``
and reads its debug lines (OpenSSH 9.2, Debian 12). The client gets only public key
files, so after the server's PK_OK it fails to load the private key ("Load key ...: error
in libcrypto") and goes on to the next key: it never authenticates, never prompts
(BatchMode, stdin from /dev/null, its own session without a terminal) and is killed by
PID when the time budget runs out. It reads no user or system configuration (``-F
/dev/null``, HOME a private temporary directory); the known_hosts file holds only the
phoned-home keys; the operator's keys are written only to that directory (mode 0700),
which is removed afterwards.

One connection offers every key: an accepted query does not count against the server's
MaxAuthTries, a refused one does, and a server that disconnects with "Too many
authentication failures" is asked again about the keys it did not answer. Fewer
connections matter: OpenSSH 9.8 and later penalise a source address whose connections
end unauthenticated (``PerSourcePenalties``).

Limits of the query: sshd answers PK_OK before it applies ``PermitRootLogin no`` (a key
"accepted" for root may still not log in there), and before ``AuthenticationMethods``
asks for a second factor. Key options in authorized_keys lines (``from=``, ``command=``)
are not checked; the key itself is.

Errors: input that comes from data (the address, the phoned-home keys, the operator's
keys) gives a failed :class:`ContractResult` (``checks["retryable"]`` False); arguments
that only a programming error gets wrong (user name, port, timeout) raise ValueError; a
missing ssh binary raises :class:`SshClientMissing`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("appliance.lifecycle")

#: Debian's OpenSSH client (package openssh-client).
SSH_BINARY = "/usr/bin/ssh"
#: Public key algorithms accepted in host key and authorized_keys lines.
KEY_TYPES = frozenset({
    "ssh-ed25519", "ssh-rsa", "ssh-dss",
    "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
})
#: Login methods that mean "password login is on".
PASSWORD_METHODS = ("password", "keyboard-interactive")
#: Longest key line accepted (an RSA 16384 key is about 2.8 kB).
MAX_KEY_LINE = 16384

_USER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_FP_RE = re.compile(r"SHA256:[A-Za-z0-9+/]+")
_CONNECT_ERROR_RE = re.compile(r"^ssh: connect to host \S+ port \d+: (?P<why>.+)$")


class SshClientMissing(RuntimeError):
    """The OpenSSH client is not installed: an appliance installation problem, not the
    machine's."""


@dataclass
class ContractResult:
    ok: bool
    #: "" when ok; else one sentence naming what failed (for an event and the record).
    reason: str
    #: JSON-serialisable details: reachable, retryable, host_key, server_host_key,
    #: server_version, keys_accepted, keys_refused, keys_unchecked (fingerprints),
    #: auth_methods, password_login, connections, duration_s, ssh_error.
    checks: dict[str, Any]


@dataclass(frozen=True)
class PublicKey:
    """One OpenSSH public key: algorithm, base64 blob, optional comment."""

    kind: str
    blob: str
    comment: str = ""

    @property
    def fingerprint(self) -> str:
        """``SHA256:...`` as ``ssh-keygen -l`` and ``ssh -v`` print it."""
        digest = hashlib.sha256(base64.b64decode(self.blob)).digest()
        return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")

    def line(self) -> str:
        """The key without options or comment: what goes into files ssh reads."""
        return f"{self.kind} {self.blob}"


def parse_public_key(line: str) -> PublicKey | None:
    """The public key in an OpenSSH public key or authorized_keys line (options before the
    key are skipped), or None. The blob must decode and name the same algorithm."""
    line = line.strip()
    if not line or len(line) > MAX_KEY_LINE:
        return None
    tokens = line.split()
    for i, token in enumerate(tokens[:-1]):
        if token not in KEY_TYPES:
            continue
        blob = tokens[i + 1]
        try:
            raw = base64.b64decode(blob, validate=True)
        except (binascii.Error, ValueError):
            return None
        if len(raw) < 4:
            return None
        size = int.from_bytes(raw[:4], "big")
        if raw[4:4 + size] != token.encode():
            return None
        return PublicKey(token, blob, " ".join(tokens[i + 2:]))
    return None


def known_hosts_host(address: str, port: int) -> str:
    """How ssh names ``address``:``port`` in known_hosts: bare on port 22, else
    ``[address]:port`` (IPv6 too)."""
    return address if port == 22 else f"[{address}]:{port}"


def known_hosts(address: str, port: int, host_keys: list[PublicKey]) -> str:
    """A known_hosts file trusting exactly ``host_keys`` for ``address``:``port``."""
    host = known_hosts_host(address, port)
    return "".join(f"{host} {key.line()}\n" for key in host_keys)


@dataclass
class SshTranscript:
    """What one ``ssh -v`` run said about the server (see :func:`parse_ssh_verbose`)."""

    #: the server sent its SSH version (the TCP connection and banner exchange worked)
    reachable: bool = False
    #: why the connection or the banner exchange failed ("" if it did not)
    connect_error: str = ""
    server_version: str = ""
    #: "ssh-ed25519 SHA256:..." the server presented
    server_host_key: str = ""
    #: "matches" (ssh found it in our known_hosts), "differs", "" (not that far)
    host_key: str = ""
    #: the server answered a login attempt with its list of methods (even an empty one)
    auth_listed: bool = False
    #: every method the server listed as able to continue, in order of first mention
    auth_methods: list[str] = field(default_factory=list)
    #: fingerprints ssh offered, the server accepted (PK_OK), the server refused
    offered: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    #: the server disconnected: "Too many authentication failures" (MaxAuthTries)
    too_many_failures: bool = False
    #: ssh logged in although it holds no private key (e.g. "none" authentication)
    authenticated: bool = False
    #: the last line ssh printed that is not a debug line
    error: str = ""


def parse_ssh_verbose(text: str, key_dir: str = "") -> SshTranscript:
    """Read the stderr of ``ssh -v`` (OpenSSH 9.2) given only public key files.

    The server can print text there too (its SSH_MSG_USERAUTH_BANNER, shown verbatim,
    newlines included, after "SSH2_MSG_SERVICE_ACCEPT received"), so host key lines count
    only before that line, login lines only after it, and with ``key_dir`` (the private
    temporary directory holding the key files, which the server cannot know) only
    "Offering"/"accepts" lines naming a key file in it count.

    Lines relied on::

        debug1: Remote protocol version 2.0, remote software version OpenSSH_9.2p1 ...
        debug1: Server host key: ssh-ed25519 SHA256:...
        debug1: Host '[10.0.0.5]:2222' is known and matches the ED25519 host key.
        Host key verification failed.
        debug1: SSH2_MSG_SERVICE_ACCEPT received
        debug1: Authentications that can continue: publickey,password
        debug1: Offering public key: /tmp/.../k0 ED25519 SHA256:... explicit
        debug1: Server accepts key: /tmp/.../k0 ED25519 SHA256:... explicit
        Received disconnect from ... port 22:2: Too many authentication failures
        ssh: connect to host 10.0.0.5 port 22: Connection refused
        Connection timed out during banner exchange
        kex_exchange_identification: Connection closed by remote host
        Authenticated to 10.0.0.5 ([10.0.0.5]:22) using "none".

    An offered key is refused when the server's next answer is a failure (another
    "Authentications that can continue", or the MaxAuthTries disconnect, which sshd sends
    only after counting that key's failure).
    """
    t = SshTranscript()
    pending: str | None = None  # fingerprint offered, answer not seen yet
    auth = False  # past "SSH2_MSG_SERVICE_ACCEPT received": the login phase
    key_prefix = f"{key_dir.rstrip('/')}/" if key_dir else ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("debug"):
            msg = line.split(": ", 1)[1] if ": " in line else ""
            if not auth:
                if msg.startswith("Remote protocol version "):
                    t.reachable = True
                    _, _, version = msg.partition("remote software version ")
                    t.server_version = version.strip()
                elif msg.startswith("Server host key: "):
                    t.server_host_key = msg.removeprefix("Server host key: ").strip()
                elif msg.startswith("Host '") and " is known and matches the " in msg:
                    if t.host_key != "differs":
                        t.host_key = "matches"
                elif msg == "SSH2_MSG_SERVICE_ACCEPT received":
                    auth = True
            elif msg.startswith("Authentications that can continue:"):
                t.auth_listed = True
                methods = msg.split(":", 1)[1].strip()
                for method in filter(None, (m.strip() for m in methods.split(","))):
                    if method not in t.auth_methods:
                        t.auth_methods.append(method)
                if pending is not None:
                    _add(t.refused, pending)
                    pending = None
            elif msg.startswith("Offering public key: " + key_prefix):
                fp = _fingerprint_in(msg)
                if fp:
                    _add(t.offered, fp)
                    pending = fp
            elif msg.startswith("Server accepts key: " + key_prefix):
                fp = _fingerprint_in(msg)
                if fp:
                    _add(t.accepted, fp)
                    if fp in t.refused:
                        t.refused.remove(fp)
                    if pending == fp:
                        pending = None
            continue
        if line.startswith("Authenticated to "):  # VERBOSE level: no "debug1:" prefix
            t.authenticated = True
            continue
        if line.startswith("OpenSSH_"):  # -v prints the client's own version first
            continue
        t.error = line
        connect = _CONNECT_ERROR_RE.match(line)
        if connect:
            t.connect_error = connect.group("why")
        elif line.startswith("Connection timed out during banner exchange"):
            t.connect_error = "no SSH banner (connection timed out during banner exchange)"
        elif line.startswith("kex_exchange_identification:") or line.startswith(
                "banner exchange:"):
            t.connect_error = line
        elif not auth and (line == "Host key verification failed." or line.startswith(
                "WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED") or (
                "host key is known for" in line and "strict checking" in line)):
            t.host_key = "differs"
        elif "Too many authentication failures" in line:
            t.too_many_failures = True
            if pending is not None:
                _add(t.refused, pending)
                pending = None
    return t


def _fingerprint_in(msg: str) -> str:
    match = _FP_RE.search(msg)
    return match.group(0) if match else ""


def _add(items: list[str], item: str) -> None:
    if item not in items:
        items.append(item)


def check_contract(address: str, host_keys: list[str], authorized_keys: list[str], *,
                   user: str = "root", port: int = 22, timeout: float = 20.0
                   ) -> ContractResult:
    """Confirm the SSH contract of the machine at ``address`` (see the module docstring).

    ``host_keys``: the OpenSSH public key lines it phoned home; ``authorized_keys``: the
    operator's key lines (blank and ``#`` lines are skipped). ``timeout`` bounds the whole
    check, connections included. ``checks["retryable"]`` is True when the machine could
    not be asked yet (no route, refused, no SSH answer in time): the caller may retry.
    """
    if not _USER_RE.fullmatch(user):
        raise ValueError(f"contract check: {user!r} is not a user name")
    if not 0 < port < 65536:
        raise ValueError(f"contract check: {port!r} is not a TCP port")
    if not timeout > 0:
        raise ValueError("contract check: timeout must be more than 0 seconds")
    started = time.monotonic()

    invalid = _check_input(address, host_keys, authorized_keys)
    if isinstance(invalid, str):
        return _result(invalid, started, {"reachable": False, "retryable": False,
                                          "input": "invalid"})
    address, phoned, operator = invalid
    if not os.access(SSH_BINARY, os.X_OK):
        raise SshClientMissing(f"the contract check needs the OpenSSH client {SSH_BINARY}: "
                               "install the Debian package openssh-client")

    deadline = started + timeout
    work = Path(tempfile.mkdtemp(prefix="appliance-contract-"))  # mode 0700
    try:
        return _run_checks(work, address, port, user, phoned, operator, started, deadline)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_input(address: str, host_keys: list[str], authorized_keys: list[str]
                 ) -> str | tuple[str, list[PublicKey], list[PublicKey]]:
    """The normalised address and keys, or the reason the input is unusable."""
    try:
        ip = ipaddress.ip_address(str(address).strip())
    except ValueError:
        return f"the machine's address {str(address)[:64]!r} is not an IP address"
    phoned: list[PublicKey] = []
    for n, line in enumerate(host_keys or [], 1):
        key = parse_public_key(str(line))
        if key is None:
            return f"phoned-home host key {n} is not an OpenSSH public key line"
        bare = PublicKey(key.kind, key.blob)
        if bare not in phoned:
            phoned.append(bare)
    if not phoned:
        return "the machine phoned home no SSH host keys to check its host key against"
    operator: list[PublicKey] = []
    seen: set[str] = set()
    for n, line in enumerate(authorized_keys or [], 1):
        text = str(line).strip()
        if not text or text.startswith("#"):
            continue
        key = parse_public_key(text)
        if key is None:
            return f"operator key {n} is not an OpenSSH public key line"
        if key.fingerprint not in seen:
            seen.add(key.fingerprint)
            operator.append(key)
    if not operator:
        return "there are no operator SSH keys to check"
    return ip.compressed, phoned, operator


def _run_checks(work: Path, address: str, port: int, user: str, phoned: list[PublicKey],
                operator: list[PublicKey], started: float, deadline: float
                ) -> ContractResult:
    (work / "home").mkdir(mode=0o700)
    kh = work / "known_hosts"
    _write_private(kh, known_hosts(address, port, phoned))
    key_files = {}
    for i, key in enumerate(operator):
        path = work / f"k{i}"
        _write_private(path, key.line() + "\n")
        key_files[key.fingerprint] = path
    phoned_fps = {key.fingerprint for key in phoned}

    checks: dict[str, Any] = {
        "reachable": False, "retryable": False, "host_key": "unchecked",
        "server_host_key": "", "server_version": "", "keys_accepted": [],
        "keys_refused": [], "keys_unchecked": list(key_files), "auth_methods": [],
        "password_login": "unknown", "connections": 0, "ssh_error": "",
    }
    listed = False
    methods: list[str] = []
    accepted: list[str] = []
    refused: list[str] = []
    authenticated = False
    interrupted = False
    remaining_keys = list(key_files)
    while remaining_keys:
        left = deadline - time.monotonic()
        if left < 0.5 and checks["connections"]:
            break
        limit = max(left, 0.5)
        checks["connections"] += 1
        stderr, timed_out = _run_ssh(work, address, port, user, kh,
                                     [key_files[fp] for fp in remaining_keys], limit)
        t = parse_ssh_verbose(stderr, key_dir=str(work))
        log.debug("contract check %s port %d, ssh -v:\n%s", address, port, stderr)
        checks["ssh_error"] = f"no answer; ssh stopped after {limit:.1f} s" if timed_out \
            else t.error
        if t.server_version:
            checks["server_version"] = t.server_version
        if t.server_host_key:
            checks["server_host_key"] = t.server_host_key
        if checks["connections"] > 1 and t.host_key != "differs" and not (
                t.host_key == "matches" and t.auth_listed):
            # A later connection, for keys a MaxAuthTries disconnect left over, did not get
            # as far as the login (e.g. refused by OpenSSH 9.8's PerSourcePenalties): keep
            # what the earlier ones found.
            interrupted = True
            break
        if not t.reachable:
            why = ("no SSH answer within the time limit" if timed_out
                   else t.connect_error or t.error or "ssh ended before the SSH handshake")
            checks["retryable"] = True
            return _result(f"cannot reach SSH on {address} port {port}: {why}", started,
                           checks)
        checks["reachable"] = True
        server_fp = _fingerprint_in(t.server_host_key)
        if t.host_key == "differs" or (t.host_key == "matches" and server_fp not in phoned_fps):
            checks["host_key"] = "differs"
            return _result("host key differs from the one the machine phoned home (it "
                           f"presented {t.server_host_key or 'another key'})", started, checks)
        if t.host_key != "matches":
            checks["retryable"] = True
            why = "timed out" if timed_out else f"ended: {t.error or 'no reason given'}"
            return _result(f"SSH on {address} port {port} {why} before its host key was "
                           "verified", started, checks)
        checks["host_key"] = "matches"
        listed = listed or t.auth_listed
        for method in t.auth_methods:
            _add(methods, method)
        for fp in t.accepted:
            _add(accepted, fp)
        for fp in t.refused:
            if fp not in accepted:
                _add(refused, fp)
        authenticated = authenticated or t.authenticated
        answered = [fp for fp in remaining_keys if fp in accepted or fp in refused]
        remaining_keys = [fp for fp in remaining_keys if fp not in answered]
        if timed_out:
            interrupted = True
            break
        # Ask again only about keys a MaxAuthTries disconnect left unanswered.
        if not (t.too_many_failures and answered and not authenticated):
            break
    return _verdict(checks, address, port, user, operator, listed, methods, accepted,
                    refused, authenticated, interrupted, started)


def _verdict(checks: dict[str, Any], address: str, port: int, user: str,
             operator: list[PublicKey], listed: bool, methods: list[str], accepted: list[str],
             refused: list[str], authenticated: bool, interrupted: bool, started: float
             ) -> ContractResult:
    """The verdict once the host key matched: keys, login methods."""
    checks["auth_methods"] = methods
    checks["keys_accepted"] = accepted
    checks["keys_refused"] = refused
    checks["keys_unchecked"] = [k.fingerprint for k in operator
                                if k.fingerprint not in accepted and k.fingerprint not in refused]
    offered = [m for m in PASSWORD_METHODS if m in methods]
    if listed:
        checks["password_login"] = "offered" if offered else "refused"
    failures = []
    if authenticated:
        failures.append(f"the machine let {user} log in without any credential")
    if not listed and not authenticated:
        checks["retryable"] = True
        return _result(f"SSH on {address} port {port} ended before it listed its login "
                       f"methods: {checks['ssh_error'] or 'no reason given'}", started, checks)
    unchecked = len(checks["keys_unchecked"])
    if not accepted:
        n = len(operator)
        if "publickey" not in methods:
            failures.append(f"the machine does not offer publickey login for {user}")
        elif interrupted:
            checks["retryable"] = True
            return _result(f"SSH on {address} port {port} ended before all operator keys were "
                           f"checked: {checks['ssh_error'] or 'no reason given'}", started,
                           checks)
        elif unchecked:
            failures.append(f"none of the operator's {n} SSH key{'s' if n != 1 else ''} is "
                            f"accepted for {user} ({unchecked} could not be offered: "
                            f"{checks['ssh_error'] or 'no reason given'})")
        else:
            failures.append(f"none of the operator's {n} SSH key{'s' if n != 1 else ''} "
                            f"is accepted for {user}")
    if offered:
        failures.append(f"password login is on (the server offers {' and '.join(offered)})")
    return _result("; ".join(failures), started, checks)


def _result(reason: str, started: float, checks: dict[str, Any]) -> ContractResult:
    checks["duration_s"] = round(time.monotonic() - started, 2)
    return ContractResult(ok=not reason, reason=reason, checks=checks)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def ssh_command(address: str, port: int, user: str, known_hosts_file: Path,
                key_files: list[Path], connect_timeout: int) -> list[str]:
    """The ssh command line: no configuration read, strict host key checking against
    ``known_hosts_file`` only, only ``key_files`` (public keys) offered, nothing else
    tried, nothing forwarded, no prompt."""
    options = {
        "BatchMode": "yes", "StrictHostKeyChecking": "yes",
        "UserKnownHostsFile": str(known_hosts_file), "GlobalKnownHostsFile": "/dev/null",
        "CheckHostIP": "no", "UpdateHostKeys": "no", "HashKnownHosts": "no",
        "VerifyHostKeyDNS": "no", "IdentitiesOnly": "yes", "IdentityAgent": "none",
        "PKCS11Provider": "none",
        "PreferredAuthentications": "publickey", "PasswordAuthentication": "no",
        "KbdInteractiveAuthentication": "no", "HostbasedAuthentication": "no",
        "GSSAPIAuthentication": "no", "FingerprintHash": "sha256",
        "ConnectTimeout": str(connect_timeout), "ConnectionAttempts": "1",
        "ControlMaster": "no", "ControlPath": "none", "ProxyCommand": "none",
        "ProxyJump": "none", "ForwardAgent": "no", "ForwardX11": "no",
        "ClearAllForwardings": "yes", "PermitLocalCommand": "no", "RequestTTY": "no",
        "AddKeysToAgent": "no", "CanonicalizeHostname": "no",
    }
    cmd = [SSH_BINARY, "-v", "-F", "/dev/null", "-n"]
    for name, value in options.items():
        cmd += ["-o", f"{name}={value}"]
    for path in key_files:
        cmd += ["-i", str(path)]
    return [*cmd, "-l", user, "-p", str(port), "--", address, "true"]


def _run_ssh(work: Path, address: str, port: int, user: str, kh: Path,
             key_files: list[Path], limit: float) -> tuple[str, bool]:
    """Run ssh for at most ``limit`` seconds; its stderr and whether it was killed."""
    cmd = ssh_command(address, port, user, kh, key_files,
                      max(1, math.floor(limit - 0.5)))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work / "home"), "LC_ALL": "C"}
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env=env, cwd=work,
                                start_new_session=True)
    except FileNotFoundError as exc:
        raise SshClientMissing(f"the contract check needs the OpenSSH client {SSH_BINARY}: "
                               "install the Debian package openssh-client") from exc
    try:
        _, err = proc.communicate(timeout=limit)
        return err.decode(errors="replace"), False
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: ssh and nothing else
        except ProcessLookupError:
            pass
        try:
            _, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        return (err or b"").decode(errors="replace"), True
