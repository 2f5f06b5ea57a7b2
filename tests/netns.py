"""Network namespaces for tests: a private L2 segment, processes inside it, clean teardown.

Every namespace name starts with ``aptest-`` plus a random suffix so parallel or leftover
runs never collide; addresses are from 10.250.0.0/16 (chosen by the test). Processes
started here are tracked by PID and killed by PID on teardown, never by name.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


def run(cmd: Sequence[str], check: bool = True, **kw) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    kw.setdefault("text", True)
    return subprocess.run(list(cmd), check=check, capture_output=True, **kw)


def have_root_netns() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


@dataclass
class Namespace:
    """One network namespace. ``ns.exec([...])`` runs a command inside it."""

    name: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    def ip(self, *args: str) -> None:
        run(["ip", "-n", self.name, *args])

    def exec(self, cmd: Sequence[str], check: bool = True, timeout: float | None = 60, **kw):  # type: ignore[no-untyped-def]
        return run(["ip", "netns", "exec", self.name, *cmd], check=check, timeout=timeout, **kw)

    def popen(self, cmd: Sequence[str], log: Path | None = None, **kw) -> subprocess.Popen:  # type: ignore[no-untyped-def]
        """Start a long-running process in the namespace (own process group); tracked."""
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.name, *cmd],
            stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
            stdin=subprocess.DEVNULL, start_new_session=True, **kw,
        )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 10) -> None:
        """Stop one tracked process (its whole process group) by PID."""
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(5)
        if proc in self.procs:
            self.procs.remove(proc)

    def delete(self) -> None:
        for proc in list(self.procs):
            self.stop(proc)
        run(["ip", "netns", "del", self.name], check=False)


def new_namespace(prefix: str = "aptest") -> Namespace:
    name = f"{prefix}-{secrets.token_hex(3)}"
    run(["ip", "netns", "add", name])
    ns = Namespace(name)
    ns.ip("link", "set", "lo", "up")
    return ns


def bridge(ns: Namespace, name: str, address_cidr: str | None) -> None:
    """Create a bridge (no uplink) in ``ns``, optionally with the given address."""
    ns.ip("link", "add", name, "type", "bridge")
    if address_cidr:
        ns.ip("addr", "add", address_cidr, "dev", name)
    ns.ip("link", "set", name, "up")


def veth(a: Namespace, a_if: str, b: Namespace, b_if: str) -> None:
    """A veth pair with one end in each namespace, both up."""
    run(["ip", "link", "add", a_if, "netns", a.name, "type", "veth",
         "peer", "name", b_if, "netns", b.name])
    a.ip("link", "set", a_if, "up")
    b.ip("link", "set", b_if, "up")


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
