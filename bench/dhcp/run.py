#!/usr/bin/env python3
"""DHCP benchmark: completed DORA exchanges per second at increasing offered load.

Runs the appliance's DHCP server, dnsmasq and Kea (``kea-dhcp4``) one after the other,
in the same run, behind a veth pair between two private network namespaces, and drives
each with ``perfdhcp`` (Debian's ``kea-admin`` package) at a list of offered rates up to
a flood. See ``bench/dhcp/README.md`` for what is measured and how to read the output.

Run as root from the repository root::

    python3 bench/dhcp/run.py            # full run, about 6 minutes
    python3 bench/dhcp/run.py --quick    # about 2 minutes

Exit status: 0 when the benchmark ran (whatever the figures), 2 when setup failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Addresses. Everything lives in two namespaces created (and deleted) by this script;
# nothing is routed out of them. perfdhcp's DHCPv4 packets always carry its own address
# as giaddr, so the servers see the client side's address as a relay on the subnet.
SUBNET = "10.250.0.0/16"
NETMASK = "255.255.0.0"
SERVER_ADDR = "10.250.50.1"
CLIENT_ADDR = "10.250.50.2"
POOL_FIRST = "10.250.60.0"
POOL_LAST = "10.250.255.254"  # 50,175 addresses
LEASE_TIME = 3600

FULL_RATES = ["100", "250", "500", "1000", "2000", "4000", "8000", "flood"]
QUICK_RATES = ["500", "2000", "8000", "flood"]
SERVER_NAMES = ("appliance", "dnsmasq", "kea")
LABELS = {"appliance": "appliance", "dnsmasq": "dnsmasq", "kea": "Kea"}


class SetupError(RuntimeError):
    """The test bed or a server could not be set up; the run is not meaningful."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sh(cmd: list[str], check: bool = True, timeout: float = 60,
       **kw) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise SetupError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


# --------------------------------------------------------------------------- test bed


class Testbed:
    """A server namespace and a client namespace joined by one veth pair."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.srv_ns = f"bdhcp-srv-{tag}"
        self.cli_ns = f"bdhcp-cli-{tag}"
        self.srv_if = f"bdh{tag}s"  # at most 15 characters
        self.cli_if = f"bdh{tag}c"
        self.created: list[str] = []

    def up(self) -> None:
        for ns in (self.srv_ns, self.cli_ns):
            sh(["ip", "netns", "add", ns])
            self.created.append(ns)
        sh(["ip", "link", "add", self.srv_if, "netns", self.srv_ns, "type", "veth",
            "peer", "name", self.cli_if, "netns", self.cli_ns])
        for ns, ifname, addr in ((self.srv_ns, self.srv_if, SERVER_ADDR),
                                 (self.cli_ns, self.cli_if, CLIENT_ADDR)):
            sh(["ip", "-n", ns, "link", "set", "lo", "up"])
            sh(["ip", "-n", ns, "addr", "add", f"{addr}/16", "dev", ifname])
            sh(["ip", "-n", ns, "link", "set", ifname, "up"])
        # Wait for the link (and IPv4 address) to be usable on both ends.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            res = sh(["ip", "-n", self.cli_ns, "-o", "link", "show", self.cli_if], check=False)
            if "LOWER_UP" in res.stdout:
                return
            time.sleep(0.1)
        raise SetupError("veth did not come up")

    def down(self) -> None:
        for ns in self.created:
            sh(["ip", "netns", "del", ns], check=False)
        self.created.clear()

    def udp_rcvbuf_errors(self, ns: str) -> int:
        """The namespace's UDP RcvbufErrors: datagrams dropped because a socket was full."""
        res = sh(["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"], check=False)
        rows = [line.split()[1:] for line in res.stdout.splitlines() if line.startswith("Udp:")]
        if len(rows) < 2 or "RcvbufErrors" not in rows[0]:
            return 0
        return int(rows[1][rows[0].index("RcvbufErrors")])

    def udp67_bound(self) -> bool:
        """Is anything listening for DHCP (UDP or packet socket) in the server namespace?"""
        res = sh(["ip", "netns", "exec", self.srv_ns, "ss", "-H", "-uanp0"], check=False)
        for line in res.stdout.splitlines():
            if re.search(r":67\s", line) or (line.startswith("p_") and self.srv_if in line):
                return True
        return False


# --------------------------------------------------------------------------- processes


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_list(spec: str) -> list[int]:
    """``0,2-3`` -> [0, 2, 3] (taskset's CPU list syntax)."""
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def busy_seconds(cpus: list[int]) -> float:
    """Non-idle CPU seconds of these CPUs since boot (from /proc/stat)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            v = [int(x) for x in values]
            total += sum(v[:8]) - v[3] - v[4]  # all but idle and iowait (guest is in user)
    return total / ticks


def cpu_seconds(root: int) -> float:
    """User + system CPU seconds used so far by a process tree (live processes only)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in tree_pids(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


class CpuQuota:
    """A cgroup-v1 ``cpu`` group with a CFS quota: every server started through
    ``wrapper()`` (and all it starts) gets at most ``percent`` of one core, in 10 ms
    periods (short enough that a throttled server stalls for milliseconds, not for the
    tens of milliseconds that would overflow every socket buffer)."""

    ROOT = Path("/sys/fs/cgroup/cpu")
    PERIOD_US = 10_000

    def __init__(self, percent: int) -> None:
        if not (self.ROOT / "cpu.cfs_quota_us").exists():
            raise SetupError(f"--server-cpu needs the cgroup-v1 cpu controller at {self.ROOT}")
        self.path = self.ROOT / f"bench-dhcp-{os.getpid()}"
        self.path.mkdir()
        (self.path / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
        (self.path / "cpu.cfs_quota_us").write_text(str(self.PERIOD_US * percent // 100))

    def wrapper(self) -> list[str]:
        """Command prefix that joins the group, then execs the server."""
        return ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh"]

    def remove(self) -> None:
        for _ in range(50):  # the last server may take a moment to be reaped
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)
        log(f"could not remove {self.path}")


class Server:
    """One DHCP server under test. Subclasses write its config and build its command."""

    name = ""

    def __init__(self, bed: Testbed, work: Path) -> None:
        self.bed = bed
        self.work = work / self.name
        self.work.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.state: Path | None = None
        self.logfile: Path | None = None
        self.runs = 0
        #: ``taskset -c CPUS`` for the server and everything it starts (empty: no pinning)
        self.pin: list[str] = []
        #: command prefix outside the namespace (``ip netns exec`` hides /sys/fs/cgroup)
        self.outer: list[str] = []

    # hooks
    def prepare(self) -> None:
        """One-time preparation (before the first start)."""

    def fresh_state(self, state: Path) -> None:
        """Populate an empty state directory for one start."""

    def command(self, state: Path) -> list[str]:
        raise NotImplementedError

    def env(self, state: Path) -> dict[str, str]:
        return dict(os.environ)

    def version(self) -> str:
        return ""

    # lifecycle
    def start(self) -> None:
        self.runs += 1
        self.state = self.work / f"state-{self.runs:02d}"
        self.state.mkdir()
        self.fresh_state(self.state)
        self.logfile = self.state / "server.log"
        out = open(self.logfile, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [*self.outer, "ip", "netns", "exec", self.bed.srv_ns, *self.pin,
             *self.command(self.state)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=self.env(self.state), cwd=self.state,
        )
        out.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SetupError(f"{self.name} exited with {self.proc.returncode} at start:\n"
                                 + self.log_tail())
            if self.bed.udp67_bound():
                time.sleep(0.5)  # let it finish whatever it does after binding
                if self.proc.poll() is None:
                    return
            time.sleep(0.1)
        self.stop()
        raise SetupError(f"{self.name} did not bind port 67 within 60 s:\n" + self.log_tail())

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)  # the group we created for it
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    log(f"  {self.name} (pid {proc.pid}) ignored SIGTERM for 15 s; SIGKILL")
        finally:
            # Also when interrupted while waiting: never leave the server behind.
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(10)
            self.proc = None
        # Wait for the port to be free before the next start.
        deadline = time.monotonic() + 10
        while self.bed.udp67_bound() and time.monotonic() < deadline:
            time.sleep(0.1)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        if not self.logfile or not self.logfile.exists():
            return "(no log)"
        text = self.logfile.read_text(errors="replace").splitlines()
        return "\n".join("    " + line for line in text[-lines:])


class Dnsmasq(Server):
    name = "dnsmasq"

    def command(self, state: Path) -> list[str]:
        return [
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-hosts",
            "--no-resolv", "--port=0", f"--pid-file={state / 'dnsmasq.pid'}",
            f"--interface={self.bed.srv_if}", "--bind-interfaces",
            f"--dhcp-range={POOL_FIRST},{POOL_LAST},{NETMASK},{LEASE_TIME}",
            "--dhcp-lease-max=200000",  # default 1000 would cap the pool
            f"--dhcp-leasefile={state / 'dnsmasq.leases'}",
            # Fair comparison: no ICMP probe of every new address before offering it
            # (Kea and the appliance do none), and no per-packet log lines.
            "--no-ping", "--quiet-dhcp",
            f"--log-facility={state / 'dnsmasq.log'}",
        ]

    def version(self) -> str:
        res = sh(["dnsmasq", "--version"], check=False)
        return res.stdout.splitlines()[0] if res.stdout else "?"


class Kea(Server):
    name = "kea"

    def fresh_state(self, state: Path) -> None:
        conf = {"Dhcp4": {
            # raw: Kea's default; it sees broadcast DISCOVERs on the interface.
            "interfaces-config": {"interfaces": [self.bed.srv_if], "dhcp-socket-type": "raw"},
            "lease-database": {"type": "memfile", "persist": True,
                               "name": str(state / "leases4.csv"), "lfc-interval": 0},
            "valid-lifetime": LEASE_TIME,
            "subnet4": [{
                "id": 1, "subnet": SUBNET,
                "pools": [{"pool": f"{POOL_FIRST} - {POOL_LAST}"}],
                "option-data": [{"name": "routers", "data": SERVER_ADDR}],
            }],
            "loggers": [{"name": "kea-dhcp4", "severity": "WARN",
                         "output_options": [{"output": str(state / "kea.log")}]}],
        }}
        (state / "kea-dhcp4.json").write_text(json.dumps(conf, indent=2))

    def command(self, state: Path) -> list[str]:
        return ["kea-dhcp4", "-c", str(state / "kea-dhcp4.json")]

    def env(self, state: Path) -> dict[str, str]:
        return {**os.environ, "KEA_PIDFILE_DIR": str(state), "KEA_LOCKFILE_DIR": str(state)}

    def log_tail(self, lines: int = 15) -> str:
        tail = super().log_tail(lines)
        if self.state and (self.state / "kea.log").exists():
            text = (self.state / "kea.log").read_text(errors="replace").splitlines()
            tail += "\n" + "\n".join("    " + line for line in text[-lines:])
        return tail

    def version(self) -> str:
        res = sh(["kea-dhcp4", "-v"], check=False)
        return "Kea " + res.stdout.strip()


class Appliance(Server):
    name = "appliance"

    def __init__(self, bed: Testbed, work: Path, python: str) -> None:
        super().__init__(bed, work)
        self.python = python
        self.template = self.work / "template"

    def config_text(self, state: Path) -> str:
        return "\n".join([
            f'state_dir = "{state}"',
            'database_url = ""',
            'log_level = "WARNING"',
            "[dhcp]",
            f'interface = "{self.bed.srv_if}"',
            "[http]",
            "enabled = false",
            "[tftp]",
            "enabled = false",
            "",
        ])

    def cli(self, state: Path, *args: str, netns: bool = False, timeout: float = 120
            ) -> list[str]:
        cmd = [self.python, "-m", "appliance.cli", "--config", str(state / "appliance.toml"),
               *args]
        return ["ip", "netns", "exec", self.bed.srv_ns, *cmd] if netns else cmd

    def env(self, state: Path) -> dict[str, str]:
        path = os.environ.get("PYTHONPATH", "")
        return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO)}

    def prepare(self) -> None:
        """Create the database once (schema + subnet); every start copies it."""
        self.template.mkdir()
        (self.template / "appliance.toml").write_text(self.config_text(self.template))
        env = self.env(self.template)
        for args in (["db", "upgrade"],
                     ["subnet", "add", SUBNET, "--pool", f"{POOL_FIRST}-{POOL_LAST}",
                      "--lease-time", str(LEASE_TIME), "--router", SERVER_ADDR]):
            res = sh(self.cli(self.template, *args), check=False, env=env, cwd=self.template,
                     timeout=120)
            if res.returncode != 0:
                raise SetupError(f"appliance {' '.join(args)} failed ({res.returncode}):\n"
                                 f"{res.stdout}{res.stderr}")

    def fresh_state(self, state: Path) -> None:
        for item in self.template.iterdir():
            if item.is_file() and item.name != "appliance.toml":
                shutil.copy2(item, state / item.name)
        (state / "appliance.toml").write_text(self.config_text(state))

    def command(self, state: Path) -> list[str]:
        return self.cli(state, "serve", "--only", "dhcp")

    def version(self) -> str:
        return appliance_fingerprint()


def appliance_fingerprint() -> str:
    """Which appliance code ran: git HEAD plus a hash of the working tree's Python files."""
    head = sh(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=False)
    digest = hashlib.sha256()
    files = sorted((REPO / "appliance").rglob("*.py"))
    for path in files:
        digest.update(str(path.relative_to(REPO)).encode())
        digest.update(path.read_bytes())
    server = REPO / "appliance" / "dhcp" / "server.py"
    when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(server.stat().st_mtime))
            if server.exists() else "absent")
    commit = head.stdout.strip() or "no commit"
    return (f"git {commit}, working tree appliance/**.py sha256 {digest.hexdigest()[:12]}, "
            f"appliance/dhcp/server.py modified {when}")


def code_part(fingerprint: str) -> str:
    """The fingerprint without the git commit: a commit alone does not change the code."""
    return fingerprint.split(", ", 1)[-1]


def appliance_available() -> str:
    """Empty when the appliance's DHCP server looks runnable, else why not."""
    for rel in ("appliance/cli.py", "appliance/dhcp/server.py"):
        if not (REPO / rel).exists():
            return f"{rel} does not exist yet"
    return ""


# --------------------------------------------------------------------------- perfdhcp


@dataclass
class Exchange:
    sent: int = 0
    received: int = 0
    drops: int = 0
    orphans: int = 0
    avg_delay_ms: float | None = None


@dataclass
class LevelResult:
    server: str
    level: str  # "100", ..., "flood", or the 4xC rate
    rate: int | None  # perfdhcp -r, None for flood
    duration: float
    rep: int = 1  # repetition of the level (1..--repeat)
    do: Exchange = field(default_factory=Exchange)
    ra: Exchange = field(default_factory=Exchange)
    perfdhcp_rate: float | None = None  # perfdhcp's own "Rate:" line
    cpu_percent: float | None = None  # server process tree, 100 = one core
    #: with --pin: CPU time of everything else on the server's CPUs (other users' work,
    #: interrupts), 100 = one core; what the server could not have used
    other_percent: float | None = None
    #: with --pin: how busy perfdhcp's CPUs were (all users), 100 = one core; at 100 the
    #: load generator, not the server, sets the pace
    client_percent: float | None = None
    cli_rcvbuf_drops: int = 0  # UDP datagrams dropped at perfdhcp's full socket
    srv_rcvbuf_drops: int = 0  # UDP datagrams dropped at the server's full socket
    wall: float = 0.0
    error: str = ""

    @property
    def dora_per_s(self) -> float:
        return self.ra.received / self.duration

    @property
    def cpu_us_per_dora(self) -> float | None:
        """Server CPU time per completed exchange (µs): what an exchange costs the
        server, whatever share of a core it got."""
        if self.cpu_percent is None or not self.ra.received:
            return None
        return self.cpu_percent / 100 * self.wall / self.ra.received * 1e6

    @property
    def offered_per_s(self) -> float:
        """DISCOVERs perfdhcp actually sent per second."""
        return self.do.sent / self.duration


SECTION_RE = re.compile(r"\*\*\*Statistics for: (\S+)\*\*\*")


def parse_perfdhcp(text: str) -> tuple[dict[str, Exchange], float | None]:
    sections: dict[str, Exchange] = {}
    current: Exchange | None = None
    rate = None
    for line in text.splitlines():
        line = line.strip()
        m = SECTION_RE.match(line)
        if m:
            current = sections.setdefault(m.group(1), Exchange())
            continue
        m = re.match(r"Rate: ([0-9.e+-]+) 4-way exchanges/second", line)
        if m:
            rate = float(m.group(1))
            continue
        if current is None:
            continue
        for key, attr in (("sent packets", "sent"), ("received packets", "received"),
                          ("drops", "drops"), ("orphans", "orphans")):
            m = re.fullmatch(rf"{key}: (\d+)", line)
            if m:
                setattr(current, attr, int(m.group(1)))
        m = re.fullmatch(r"avg delay: ([0-9.]+) ms", line)
        if m and current.avg_delay_ms is None:
            current.avg_delay_ms = float(m.group(1))
    return sections, rate


def run_perfdhcp(bed: Testbed, server: Server, level: str, duration: float, clients: int,
                 unicast: bool, raw_dir: Path, pin: list[str], rep: int,
                 server_cpus: list[int], client_cpus: list[int]) -> LevelResult:
    rate = None if level == "flood" else int(level)
    cmd = ["ip", "netns", "exec", bed.cli_ns, *pin, "perfdhcp", "-4", "-l", bed.cli_if,
           "-R", str(clients), "-p", f"{duration:g}"]
    if rate is not None:
        cmd += ["-r", str(rate)]
    if unicast:
        cmd.append(SERVER_ADDR)
    res = LevelResult(server=server.name, level=level, rate=rate, duration=duration, rep=rep)
    assert server.proc is not None
    cli0, srv0 = bed.udp_rcvbuf_errors(bed.cli_ns), bed.udp_rcvbuf_errors(bed.srv_ns)
    busy0 = busy_seconds(server_cpus) if server_cpus else 0.0
    cbusy0 = busy_seconds(client_cpus) if client_cpus else 0.0
    cpu0, t0 = cpu_seconds(server.proc.pid), time.monotonic()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    except subprocess.TimeoutExpired:
        res.error = "perfdhcp did not finish"
        return res
    res.wall = time.monotonic() - t0
    if server.alive():
        used = cpu_seconds(server.proc.pid) - cpu0
        res.cpu_percent = 100 * used / res.wall
        if server_cpus:
            busy = busy_seconds(server_cpus) - busy0
            res.other_percent = max(0.0, 100 * (busy - used) / res.wall)
        if client_cpus:
            res.client_percent = 100 * (busy_seconds(client_cpus) - cbusy0) / res.wall
    else:
        res.error = f"{server.name} died during the run:\n{server.log_tail()}"
    res.cli_rcvbuf_drops = bed.udp_rcvbuf_errors(bed.cli_ns) - cli0
    res.srv_rcvbuf_drops = bed.udp_rcvbuf_errors(bed.srv_ns) - srv0
    (raw_dir / f"{server.name}-{level}-{rep}.txt").write_text(
        " ".join(cmd) + f"\nexit {out.returncode}\n" + out.stdout + out.stderr)
    # Exit 3 means "some exchanges were not completed": expected under load.
    if out.returncode not in (0, 3):
        res.error = f"perfdhcp exit {out.returncode}: {out.stderr.strip()[-300:]}"
        return res
    sections, res.perfdhcp_rate = parse_perfdhcp(out.stdout)
    if "DISCOVER-OFFER" not in sections:
        res.error = "could not parse perfdhcp output"
        return res
    res.do = sections["DISCOVER-OFFER"]
    res.ra = sections.get("REQUEST-ACK", Exchange())
    return res


# --------------------------------------------------------------------------- report


def fs_type(path: Path) -> str:
    res = sh(["stat", "-f", "-c", "%T", str(path)], check=False)
    return res.stdout.strip() or "?"


def fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def level_label(level: str, collapse_level: str | None) -> str:
    if level == "flood":
        return "flood"
    if level == collapse_level:
        return f"{int(level):,} (4xC)"
    return f"{int(level):,}"


def print_details(results: list[LevelResult], collapse_level: str | None) -> None:
    print("\nPer-server detail (counts over the whole period; offered/s = DISCOVERs perfdhcp "
          "actually sent per second;\n srv full / cli full = UDP datagrams the kernel dropped "
          "because the server's / perfdhcp's socket buffer was full;\n other = CPU time of "
          "everything but the server on the server's CPUs (with --pin; other users' work, "
          "interrupts): 100% = one core;\n us/DORA = server CPU time per completed exchange; "
          "cli CPU = how busy perfdhcp's CPUs were (with --pin), 100% = one core)")
    head = (f"{'server':<10} {'level':>13} {'rep':>3} {'offered/s':>10} {'OFFER rx':>9} "
            f"{'REQ tx':>9} {'ACK rx':>9} {'DORA/s':>8} {'DO ms':>7} {'RA ms':>7} {'srv CPU':>8} "
            f"{'srv full':>9} {'cli full':>9} {'other':>6} {'us/DORA':>8} {'cli CPU':>8}")
    print(head)
    print("-" * len(head))
    for r in results:
        if r.error and not r.do.sent:
            print(f"{r.server:<10} {level_label(r.level, collapse_level):>13} {r.rep:>3}  ERROR: "
                  f"{r.error.splitlines()[0]}")
            continue
        delay = [("-" if x is None else f"{x:.1f}") for x in (r.do.avg_delay_ms,
                                                               r.ra.avg_delay_ms)]
        cpu = "-" if r.cpu_percent is None else f"{r.cpu_percent:.0f}%"
        other = "-" if r.other_percent is None else f"{r.other_percent:.0f}%"
        cost = "-" if r.cpu_us_per_dora is None else f"{r.cpu_us_per_dora:.0f}"
        client = "-" if r.client_percent is None else f"{r.client_percent:.0f}%"
        print(f"{r.server:<10} {level_label(r.level, collapse_level):>13} {r.rep:>3} "
              f"{r.offered_per_s:>10,.0f} {r.do.received:>9,} {r.ra.sent:>9,} "
              f"{r.ra.received:>9,} {r.dora_per_s:>8,.0f} {delay[0]:>7} {delay[1]:>7} "
              f"{cpu:>8} {r.srv_rcvbuf_drops:>9,} {r.cli_rcvbuf_drops:>9,} {other:>6} "
              f"{cost:>8} {client:>8}"
              + ("  (!) " + r.error.splitlines()[0] if r.error else ""))


def print_costs(by: dict[tuple[str, str], list[LevelResult]], levels: list[str],
                cols: list[str], collapse_level: str | None) -> None:
    """Median server CPU per completed exchange, and how busy the load generator's CPUs
    were, per level: a server's cost per exchange does not depend on the share of a core
    it got, so it compares servers where the rate is set by the load generator."""
    print("\nServer CPU per completed DORA, median us (lower is cheaper); cli CPU: median "
          "busy share of perfdhcp's CPUs (with --pin)")
    head = f"{'offered DORA/s':>16}" + "".join(f" {LABELS[n] + ' us':>14}" for n in cols) + (
        f" {'appliance/Kea':>14}" + "".join(f" {LABELS[n] + ' cli':>14}" for n in cols))
    print(head)
    print("-" * len(head))
    for level in levels:
        row = f"{level_label(level, collapse_level):>16}"
        costs: dict[str, float] = {}
        for n in cols:
            vals = [c for r in by.get((n, level), []) if not r.error
                    and (c := r.cpu_us_per_dora) is not None]
            if vals:
                costs[n] = statistics.median(vals)
            row += f" {(f'{costs[n]:.0f}' if n in costs else '-'):>14}"
        ratio = (f"{costs['appliance'] / costs['kea']:.2f}"
                 if "appliance" in costs and costs.get("kea") else "-")
        row += f" {ratio:>14}"
        for n in cols:
            vals = [c for r in by.get((n, level), []) if not r.error
                    and (c := r.client_percent) is not None]
            row += f" {(f'{statistics.median(vals):.0f}%' if vals else '-'):>14}"
        print(row)


def median_rate(runs: list[LevelResult]) -> float | None:
    """Median completed DORA/s of the runs of one server at one level (None if none ran)."""
    rates = [r.dora_per_s for r in runs if not r.error]
    return statistics.median(rates) if rates else None


def fmt_spread(runs: list[LevelResult]) -> str:
    """``median`` or, with repetitions, ``median (min-max)``; ERR when none succeeded."""
    rates = [r.dora_per_s for r in runs if not r.error]
    if not rates:
        return "ERR" if runs else "-"
    med = statistics.median(rates)
    if len(runs) == 1:
        return f"{med:,.0f}"
    return f"{med:,.0f} ({min(rates):,.0f}-{max(rates):,.0f})" + ("!" if len(rates) < len(runs)
                                                                else "")


def pair_ratios(a_runs: list[LevelResult], k_runs: list[LevelResult]) -> list[float]:
    """appliance/Kea of the runs of the same repetition (run back to back)."""
    kea = {r.rep: r for r in k_runs if not r.error and r.dora_per_s}
    return [a.dora_per_s / kea[a.rep].dora_per_s for a in a_runs
            if not a.error and a.rep in kea]


def main() -> int:  # noqa: C901 - a linear script
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"levels {','.join(QUICK_RATES)} + 4xC, 4 s each (about 2 minutes)")
    ap.add_argument("--rates", help="comma-separated offered rates (DORA/s), 'flood' allowed "
                    f"(default {','.join(FULL_RATES)})")
    ap.add_argument("--duration", type=float, help="seconds per level (default 10, quick 4)")
    ap.add_argument("--servers", default=",".join(SERVER_NAMES),
                    help="comma-separated subset of appliance,dnsmasq,kea")
    ap.add_argument("--clients", type=int, default=40000,
                    help="simulated clients (perfdhcp -R; the pool has 50,175 addresses)")
    ap.add_argument("--no-collapse-level", action="store_true",
                    help="do not add the 4 x Kea-capacity level")
    ap.add_argument("--unicast", action="store_true",
                    help=f"send to {SERVER_ADDR} (like a relay agent) instead of broadcast")
    ap.add_argument("--python", default=sys.executable,
                    help="Python interpreter that runs the appliance")
    ap.add_argument("--tmpfs", action="store_true",
                    help="keep the servers' state (lease files, SQLite) on /dev/shm instead of "
                    "the disk-backed temporary directory")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    ap.add_argument("--json", type=Path, help="also write all results to this JSON file")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="run every level N times for every server (back to back, the "
                    "servers' order reversed every other time) and report the median and "
                    "the range (default 1)")
    ap.add_argument("--server-cpu", type=int, metavar="PCT",
                    help="cap every server (with all it starts) at PCT%% of one core with a "
                    "cgroup CPU quota, so the server and not the load generator sets the "
                    "pace; the same cap for all servers (use with --pin)")
    ap.add_argument("--pin", metavar="CLIENT:SERVER",
                    help="CPU lists for taskset: perfdhcp on CLIENT, every server (and all "
                    "it starts) on SERVER, e.g. 0:1; the same for all servers")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.server_cpu is not None and not 5 <= args.server_cpu <= 100:
        ap.error("--server-cpu must be between 5 and 100 (percent of one core)")
    pin_client: list[str] = []
    pin_server: list[str] = []
    if args.pin:
        cpus = args.pin.split(":")
        if len(cpus) != 2 or not all(re.fullmatch(r"[0-9,-]+", c) for c in cpus):
            ap.error(f"bad --pin {args.pin!r} (want CLIENT:SERVER CPU lists, e.g. 0:1)")
        pin_client, pin_server = ["taskset", "-c", cpus[0]], ["taskset", "-c", cpus[1]]
    server_cpus = cpu_list(args.pin.split(":")[1]) if args.pin else []
    client_cpus = cpu_list(args.pin.split(":")[0]) if args.pin else []

    duration = args.duration or (4.0 if args.quick else 10.0)
    levels = (args.rates.split(",") if args.rates
              else (QUICK_RATES if args.quick else FULL_RATES))
    levels = [lv.strip() for lv in levels if lv.strip()]
    for lv in levels:
        if lv != "flood" and not (lv.isdigit() and int(lv) > 0):
            ap.error(f"bad rate {lv!r}")
    wanted = [s.strip() for s in args.servers.split(",") if s.strip()]
    for s in wanted:
        if s not in SERVER_NAMES:
            ap.error(f"unknown server {s!r}")

    if os.geteuid() != 0:
        log("setup failed: run as root (network namespaces)")
        return 2
    for tool in ("ip", "ss", "perfdhcp", "dnsmasq", "kea-dhcp4") + (("taskset",) if args.pin
                                                                     else ()):
        if shutil.which(tool) is None:
            log(f"setup failed: {tool} not found (apt-get install iproute2 dnsmasq "
                "kea-dhcp4-server kea-admin)")
            return 2

    notes: list[str] = []
    skip_appliance = ""
    if "appliance" in wanted:
        skip_appliance = appliance_available()
        if skip_appliance:
            notes.append(f"appliance not run: {skip_appliance}")
            wanted.remove("appliance")

    work = Path(tempfile.mkdtemp(prefix="bench-dhcp-", dir="/dev/shm" if args.tmpfs else None))
    raw_dir = work / "perfdhcp"
    raw_dir.mkdir()
    bed = Testbed()
    quota: CpuQuota | None = None
    servers: dict[str, Server] = {}
    results: list[LevelResult] = []
    failed: dict[str, str] = {}
    collapse_level: str | None = None
    started = time.monotonic()
    load_before = os.getloadavg()
    app_code_before = appliance_fingerprint() if "appliance" in wanted else ""

    def on_signal(signum, frame):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        bed.up()
        if args.server_cpu is not None:
            quota = CpuQuota(args.server_cpu)
        for name in wanted:
            if name == "appliance":
                servers[name] = Appliance(bed, work, args.python)
            elif name == "dnsmasq":
                servers[name] = Dnsmasq(bed, work)
            else:
                servers[name] = Kea(bed, work)
            servers[name].pin = pin_server
            servers[name].outer = quota.wrapper() if quota else []
        for name, srv in list(servers.items()):
            try:
                srv.prepare()
            except (SetupError, subprocess.TimeoutExpired) as exc:
                failed[name] = str(exc)
                log(f"{name}: preparation failed: {exc}")
                del servers[name]
        if not servers:
            raise SetupError("no server could be prepared")

        log(f"work directory {work}; namespaces {bed.srv_ns} / {bed.cli_ns}; "
            f"{duration:g} s per level; fresh server state for every level")

        def run_level(level: str) -> None:
            for rep in range(1, args.repeat + 1):
                order = list(servers.items())
                if rep % 2 == 0:
                    order.reverse()  # no server always runs first (or right after another)
                for name, srv in order:
                    if name in failed:
                        continue
                    label = level_label(level, collapse_level)
                    log(f"  {label:>13}  {name:<9} #{rep} ...")
                    try:
                        srv.start()
                    except SetupError as exc:
                        failed[name] = str(exc)
                        log(f"{name}: {exc}")
                        results.append(LevelResult(name, level, None, duration, rep=rep,
                                                   error=str(exc)))
                        continue
                    try:
                        res = run_perfdhcp(bed, srv, level, duration, args.clients,
                                           args.unicast, raw_dir, pin_client, rep,
                                           server_cpus, client_cpus)
                    finally:
                        srv.stop()
                    results.append(res)
                    log(f"  {label:>13}  {name:<9} #{rep} offered "
                        f"{res.offered_per_s:>8,.0f}/s  DORA {res.dora_per_s:>7,.0f}/s"
                        + (f"  ({res.error.splitlines()[0]})" if res.error else ""))

        for level in levels:
            run_level(level)

        kea_medians = [m for lv in levels
                       if (m := median_rate([r for r in results
                                             if r.server == "kea" and r.level == lv]))]
        if not args.no_collapse_level and kea_medians and "appliance" in servers:
            capacity = max(kea_medians)  # Kea's best level (median over repetitions)
            collapse_level = str(max(1, round(4 * capacity)))
            run_level(collapse_level)
    except SetupError as exc:
        log(f"setup failed: {exc}")
        return 2
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        for srv in servers.values():
            srv.stop()
        if quota is not None:
            quota.remove()
        bed.down()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    elapsed = time.monotonic() - started
    load_after = os.getloadavg()

    # ---------------------------------------------------------------- report
    by: dict[tuple[str, str], list[LevelResult]] = {}
    for r in results:
        by.setdefault((r.server, r.level), []).append(r)
    all_levels = levels + ([collapse_level] if collapse_level else [])
    shown = [n for n in SERVER_NAMES if n in servers or n in failed]

    print("\nDHCP benchmark: completed DORA exchanges per second (ACKs received / period)")
    print(f"perfdhcp -4 over veth, {'unicast to the server' if args.unicast else 'broadcast'}, "
          f"-R {args.clients}, {duration:g} s per level, fresh server state per level")
    print(f"repetitions per level: {args.repeat}"
          + (" (figures: median (min-max) of the repetitions)" if args.repeat > 1 else "")
          + "; CPU pinning: " + (f"perfdhcp on CPU {pin_client[2]}, every server on CPU "
                                 f"{pin_server[2]}" if args.pin else "none")
          + ("; every server capped at "
             f"{args.server_cpu}% of one core (cgroup CPU quota, 10 ms periods)"
             if args.server_cpu is not None else ""))
    print(f"server state (leases) in {'/dev/shm (tmpfs)' if args.tmpfs else work.parent} "
          f"({fs_type(work.parent)})")
    for name in shown:
        srv = servers.get(name)
        print(f"  {LABELS[name]:<9} {srv.version() if srv else appliance_fingerprint()}")
    print(f"  load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; "
          f"{os.cpu_count()} CPUs; run took {elapsed:.0f} s")
    if app_code_before and code_part(app_code_before) != code_part(appliance_fingerprint()):
        notes.append("the appliance's code changed on disk during this run (at start: "
                     f"{app_code_before}); levels may have run different versions")
    for note in notes:
        print(f"  note: {note}")
    for name, why in failed.items():
        print(f"  note: {name} failed: {why.splitlines()[0]}")

    print_details(results, collapse_level)

    cols = [n for n in SERVER_NAMES if n in shown]
    width = 17 if args.repeat == 1 else 26
    print()
    head = f"{'offered DORA/s':>16} {'sent DISC/s':>11}" + "".join(
        f" {LABELS[n] + ' DORA/s':>{width}}" for n in cols) + f" {'appliance/Kea':>14}"
    if args.repeat > 1:
        head += f" {'pairs':>11}"
    print(head)
    print("-" * len(head))
    for level in all_levels:
        sent = [r.offered_per_s for n in cols for r in by.get((n, level), []) if not r.error]
        top = fmt_rate(max(sent) if sent else None)
        row = f"{level_label(level, collapse_level):>16} {top:>11}"
        for n in cols:
            row += f" {fmt_spread(by.get((n, level), [])):>{width}}"
        a_runs, k_runs = by.get(("appliance", level), []), by.get(("kea", level), [])
        a, k = median_rate(a_runs), median_rate(k_runs)
        row += f" {(f'{a / k:.2f}' if a is not None and k else '-'):>14}"
        if args.repeat > 1:
            pairs = pair_ratios(a_runs, k_runs)
            row += f" {(f'{min(pairs):.2f}-{max(pairs):.2f}' if pairs else '-'):>11}"
        print(row)
    peaks: dict[str, float] = {}
    row = f"{'peak':>16} {'':>11}"
    for n in cols:
        meds = [m for lv in all_levels if (m := median_rate(by.get((n, lv), []))) is not None]
        if meds:
            peaks[n] = max(meds)
        row += f" {fmt_rate(peaks.get(n)):>{width}}"
    print("-" * len(head))
    print(row)
    print("(sent DISC/s: the highest DISCOVER rate perfdhcp actually achieved at that level; "
          "peak: each server's best completed rate in this run"
          + (" (best median)" if args.repeat > 1 else "") + ";\n C: Kea's best completed rate "
          "before the 4xC level" + (" (best median)" if args.repeat > 1 else "") + ")")
    if args.repeat > 1:
        print("(appliance/Kea: ratio of the medians; pairs: lowest and highest appliance/Kea of "
              "the repetitions, each pair run back to back; '!' after a range: some "
              "repetitions failed)")

    print_costs(by, all_levels, cols, collapse_level)

    # ---------------------------------------------------------------- bars
    print("\nBars (issue 2):" + (" on the medians of the repetitions" if args.repeat > 1
                                 else ""))
    kea_flood = median_rate(by.get(("kea", "flood"), []))
    app_flood = median_rate(by.get(("appliance", "flood"), []))
    if "appliance" not in servers and "appliance" not in failed:
        print(f"  (1) flood rate >= Kea's flood rate: NOT RUN ({skip_appliance or 'not selected'})")
        print("  (2) no collapse at 4 x Kea capacity: NOT RUN")
    else:
        if kea_flood is None:
            print("  (1) flood rate >= Kea's flood rate: NOT EVALUATED (no Kea flood result)")
        elif app_flood is None:
            errs = [r.error for r in by.get(("appliance", "flood"), []) if r.error]
            why = errs[0] if errs else failed.get("appliance", "?")
            print("  (1) flood rate >= Kea's flood rate: FAIL (appliance has no flood result: "
                  f"{why.splitlines()[0]})")
        else:
            verdict = "PASS" if app_flood >= kea_flood else "FAIL"
            pairs = pair_ratios(by.get(("appliance", "flood"), []), by.get(("kea", "flood"), []))
            spread = (f"; appliance/Kea {app_flood / kea_flood:.2f}, pairs "
                      f"{min(pairs):.2f}-{max(pairs):.2f}"
                      if args.repeat > 1 and pairs and kea_flood else "")
            print(f"  (1) flood rate >= Kea's flood rate: {verdict}  (appliance "
                  f"{app_flood:,.0f}/s vs Kea {kea_flood:,.0f}/s{spread})")
        if collapse_level is None:
            print("  (2) no collapse at 4 x Kea capacity: NOT EVALUATED (no Kea capacity or "
                  "level disabled)")
        else:
            capacity = int(collapse_level) / 4
            at_runs = by.get(("appliance", collapse_level), [])
            at = median_rate(at_runs)
            peak = peaks.get("appliance", 0.0)
            if at is None or peak <= 0:
                print(f"  (2) no collapse at 4 x Kea capacity: FAIL (appliance has no result at "
                      f"{int(collapse_level):,}/s, or a peak of 0)")
            else:
                sent_4c = statistics.median(r.offered_per_s for r in at_runs if not r.error)
                verdict = "PASS" if at >= 0.9 * peak else "FAIL"
                print(f"  (2) no collapse at 4 x Kea capacity: {verdict}  (C = {capacity:,.0f}/s, "
                      f"offered {int(collapse_level):,}/s, perfdhcp sent {sent_4c:,.0f}"
                      f" DISCOVER/s; appliance completed {at:,.0f}/s = "
                      f"{100 * at / peak:.0f}% of its peak {peak:,.0f}/s; "
                      "bar 90%)")

    if args.json:
        args.json.write_text(json.dumps({
            "duration": duration, "clients": args.clients, "unicast": args.unicast,
            "repeat": args.repeat, "pin": args.pin,
            "collapse_level": collapse_level, "notes": notes, "failed": failed,
            "versions": {n: s.version() for n, s in servers.items()},
            "results": [{**asdict(r), "dora_per_s": r.dora_per_s,
                         "offered_per_s": r.offered_per_s} for r in results],
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
