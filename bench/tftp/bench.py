#!/usr/bin/env python3
"""TFTP benchmark: the appliance against tftpd-hpa (and optionally stock tftpy), side by side.

Run as root from the repository root:

    python bench/tftp/bench.py [--reps 3] [--stock-tftpy] [--workers N]
                               [--clients 100 [--clients 20]] [--no-big]

It creates two network namespaces joined by a veth pair (server side 10.250.3x.1, client
side 10.250.3x.2; one /24 per server so every server listens on port 69 of its own
address), writes random 1 MiB and 32 MiB files, starts tftpd-hpa (``in.tftpd
--foreground --secure``), the appliance (``appliance serve --only tftp``) and, with
--stock-tftpy, tftpy's unmodified TftpServer, all serving the same directory. Each case
starts N ``atftp`` clients at once inside the client namespace and times from the first
start to the last exit; every output file is size-checked and the first one
sha256-checked, a case with any failed client is reported as failed. Servers are
measured in alternation, ``--reps`` times, and the median is printed. Everything started
is stopped by PID and the namespaces are deleted on the way out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CPUACCT = Path("/sys/fs/cgroup/cpuacct")
#: cgroup v1 cpu controller: --server-cpu caps each server with a CFS quota here
CPU_CTL = Path("/sys/fs/cgroup/cpu")
QUOTA_PERIOD_US = 10_000
MiB = 1024 * 1024
CASES = [  # (file, size MiB, clients)
    ("1m.bin", 1, 1), ("1m.bin", 1, 20), ("1m.bin", 1, 100), ("32m.bin", 32, 1),
]
BLKSIZES = (512, 1468)
SERVERS = {  # name -> (server address, client address)
    "tftpd-hpa": ("10.250.30.1", "10.250.30.2"),
    "appliance": ("10.250.31.1", "10.250.31.2"),
    "tftpy-stock": ("10.250.32.1", "10.250.32.2"),
    "baseline": ("10.250.33.1", "10.250.33.2"),    # --baseline DIR: another appliance tree
}


def idle_seconds() -> float:
    """Machine-wide idle CPU time (all CPUs), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


# ---- client side: runs inside the client namespace ------------------------------------

def client_main(args: argparse.Namespace) -> int:
    out = Path(args.outdir)
    procs = []
    t0 = time.monotonic()
    for i in range(args.n):
        cmd = ["atftp"]
        if args.blksize != 512:
            cmd += ["--option", f"blksize {args.blksize}"]
        cmd += ["-g", "-r", args.file, "-l", str(out / f"o{i}"), args.host]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    # Blocking waits (Popen.wait with a timeout polls with sleeps of up to 50 ms, which
    # quantised the single-client times); a watchdog kills the clients at the deadline.
    def kill_all() -> None:
        for p in procs:
            if p.poll() is None:
                p.kill()

    watchdog = threading.Timer(args.timeout, kill_all)
    watchdog.start()
    failed = 0
    for p in procs:
        p.wait()
        if p.returncode != 0:
            failed += 1
    took = time.monotonic() - t0
    watchdog.cancel()
    size = int(args.size)
    for i in range(args.n):
        f = out / f"o{i}"
        if not f.exists() or f.stat().st_size != size:
            failed += 1
    sha = ""
    if (out / "o0").exists():
        sha = hashlib.sha256((out / "o0").read_bytes()).hexdigest()
    for i in range(args.n):
        (out / f"o{i}").unlink(missing_ok=True)
    print(json.dumps({"seconds": took, "failed": failed, "sha256": sha}))
    return 0


# ---- orchestration ---------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        tag = secrets.token_hex(3)
        self.srv = f"apbench-s-{tag}"
        self.cli = f"apbench-c-{tag}"
        self.tmp = Path(tempfile.mkdtemp(prefix="tftpbench-"))
        self.procs: dict[str, subprocess.Popen] = {}
        self.cgroups: dict[str, Path] = {}
        self.cpu_log: list[dict] = []
        self.ns_made: list[str] = []

    def setup(self) -> None:
        for ns in (self.srv, self.cli):
            sh("ip", "netns", "add", ns)
            self.ns_made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", "bs0", "netns", self.srv, "type", "veth",
           "peer", "name", "bc0", "netns", self.cli)
        for name, (s_addr, c_addr) in SERVERS.items():
            if name not in self.servers():
                continue
            sh("ip", "-n", self.srv, "addr", "add", f"{s_addr}/24", "dev", "bs0")
            sh("ip", "-n", self.cli, "addr", "add", f"{c_addr}/24", "dev", "bc0")
        sh("ip", "-n", self.srv, "link", "set", "bs0", "up")
        sh("ip", "-n", self.cli, "link", "set", "bc0", "up")
        root = self.tmp / "root"
        root.mkdir()
        self.hashes = {}
        for name, size in (("1m.bin", MiB), ("32m.bin", 32 * MiB)):
            data = os.urandom(size)
            (root / name).write_bytes(data)
            self.hashes[name] = hashlib.sha256(data).hexdigest()
        os.chmod(self.tmp, 0o755)
        os.chmod(root, 0o755)
        for f in root.iterdir():
            os.chmod(f, 0o644)
        self.root = root
        self.out = self.tmp / "out"
        self.out.mkdir()
        for name in self.servers():
            cg = CPUACCT / f"{self.srv}-clients-{name}"
            try:
                cg.mkdir()
                self.cgroups[f"clients-{name}"] = cg
            except OSError:
                pass
        self.start_servers()

    def popen(self, name: str, cmd: list[str], cwd: Path = REPO) -> None:
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115
        self.procs[name] = subprocess.Popen(
            ["ip", "netns", "exec", self.srv, *cmd], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, cwd=cwd)
        # CPU accounting only (cgroup v1 cpuacct; scheduling is not affected): a server's
        # processes, tftpd-hpa's forked per-transfer children included, land in one group.
        cg = CPUACCT / f"{self.srv}-{name}"
        try:
            cg.mkdir()
            (cg / "cgroup.procs").write_text(str(self.procs[name].pid))
            self.cgroups[name] = cg
        except OSError:
            pass
        if self.args.server_cpu is not None:
            # Scheduling: the same CPU cap for every server, all its processes included.
            cap = CPU_CTL / f"{self.srv}-{name}"
            cap.mkdir()
            self.cgroups[f"cap-{name}"] = cap
            (cap / "cpu.cfs_period_us").write_text(str(QUOTA_PERIOD_US))
            (cap / "cpu.cfs_quota_us").write_text(
                str(QUOTA_PERIOD_US * self.args.server_cpu // 100))
            (cap / "cgroup.procs").write_text(str(self.procs[name].pid))

    def start_servers(self) -> None:
        s_hpa = SERVERS["tftpd-hpa"][0]
        self.popen("tftpd-hpa", ["in.tftpd", "--foreground", "--address", f"{s_hpa}:69",
                                 "--secure", str(self.root)])
        cfg = self.tmp / "appliance.toml"
        cfg.write_text(
            f'state_dir = "{self.tmp / "state"}"\nlog_level = "WARNING"\n'
            f'[tftp]\nbind = "{SERVERS["appliance"][0]}"\nroot = "{self.root}"\n'
            f"workers = {self.args.workers}\n")
        self.config = cfg
        self.popen("appliance", [sys.executable, "-m", "appliance.cli", "--config", str(cfg),
                                 "serve", "--only", "tftp"])
        if self.args.baseline:
            bcfg = self.tmp / "baseline.toml"
            bcfg.write_text(
                f'state_dir = "{self.tmp / "state-baseline"}"\nlog_level = "WARNING"\n'
                f'[tftp]\nbind = "{SERVERS["baseline"][0]}"\nroot = "{self.root}"\n'
                f"workers = {self.args.workers}\n")
            self.popen("baseline", [sys.executable, "-m", "appliance.cli", "--config",
                                    str(bcfg), "serve", "--only", "tftp"],
                       cwd=Path(self.args.baseline).resolve())
        if self.args.stock_tftpy:
            self.popen("tftpy-stock", [sys.executable, str(REPO / "bench/tftp/stock_tftpy.py"),
                                       str(self.root), SERVERS["tftpy-stock"][0]])
        # Wait until each one serves the 1 MiB file.
        for name in self.servers():
            deadline = time.monotonic() + 30
            while True:
                r = self.client(name, "1m.bin", MiB, 1, 512, timeout=10)
                if r["failed"] == 0:
                    break
                if self.procs[name].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not come up; log:\n"
                                       + (self.tmp / f"{name}.log").read_text()[-2000:])
                time.sleep(0.5)

    def cpu_seconds(self, server: str) -> float:
        """CPU time (user + system) of all of a server's processes: tftpd-hpa's forked
        per-transfer children, the appliance's worker processes."""
        cg = self.cgroups.get(server)
        if cg is not None:
            return int((cg / "cpuacct.usage").read_text()) / 1e9
        if server not in self.procs:
            return 0.0
        # Fallback: the session's live processes and the children they reaped.
        sid = self.procs[server].pid
        tck = os.sysconf("SC_CLK_TCK")
        total = 0
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:            # field 6: session id
                total += sum(int(x) for x in fields[11:15])   # utime stime cutime cstime
        return total / tck

    def servers(self) -> list[str]:
        return [n for n in SERVERS if (n != "tftpy-stock" or self.args.stock_tftpy)
                and (n != "baseline" or self.args.baseline)]

    def client(self, server: str, file: str, size: int, n: int, blksize: int,
               timeout: float) -> dict:
        host = SERVERS[server][0]
        cmd = ["ip", "netns", "exec", self.cli, sys.executable, __file__, "--client",
               "--host", host, "--file", file, "--size", str(size), "--n", str(n),
               "--blksize", str(blksize), "--outdir", str(self.out), "--timeout", str(timeout)]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        cg = self.cgroups.get(f"clients-{server}")
        if cg is not None:     # before the clients start (ip netns exec hides the cgroupfs)
            try:
                (cg / "cgroup.procs").write_text(str(p.pid))
            except OSError:
                pass
        try:
            out, err = p.communicate(timeout=timeout + 30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            raise
        r = subprocess.CompletedProcess(cmd, p.returncode, out, err)
        if r.returncode != 0:
            raise RuntimeError(f"client failed: {r.stderr[-2000:]}")
        res = json.loads(r.stdout.strip().splitlines()[-1])
        if res["sha256"] and res["sha256"] != self.hashes[file]:
            res["failed"] += 1
        return res

    def run(self) -> list[dict]:
        rows = []
        deadline = time.monotonic() + self.args.max_seconds
        for file, size_mib, n in CASES:
            if self.args.clients and n not in self.args.clients:
                continue
            if self.args.no_big and size_mib > 1:
                continue
            for bs in BLKSIZES:
                if self.args.blksize_only and bs not in self.args.blksize_only:
                    continue
                row = {"file": f"{size_mib} MiB", "clients": n, "blksize": bs}
                samples: dict[str, list[float]] = {s: [] for s in self.servers()}
                paired: dict[str, list[float | None]] = {s: [] for s in self.servers()}
                cpu: dict[str, list[float]] = {s: [] for s in self.servers()}
                ccpu: dict[str, list[float]] = {s: [] for s in self.servers()}
                idle: dict[str, list[float]] = {s: [] for s in self.servers()}
                failures = dict.fromkeys(self.servers(), 0)
                for _rep in range(self.args.reps):
                    for s in self.servers():
                        if time.monotonic() > deadline:
                            break
                        if s == "tftpy-stock" and failures[s] and not samples[s]:
                            continue          # it failed once already; don't wait again
                        cpu0, ccpu0, idle0 = (self.cpu_seconds(s),
                                              self.cpu_seconds(f"clients-{s}"), idle_seconds())
                        r = self.client(s, file, size_mib * MiB, n, bs,
                                        timeout=self.args.case_timeout)
                        cpu[s].append(self.cpu_seconds(s) - cpu0)
                        ccpu[s].append(self.cpu_seconds(f"clients-{s}") - ccpu0)
                        idle[s].append(idle_seconds() - idle0)
                        if r["failed"]:
                            failures[s] += r["failed"]
                            paired[s].append(None)
                        else:
                            samples[s].append(r["seconds"])
                            paired[s].append(r["seconds"])
                for s in self.servers():
                    row[s] = statistics.median(samples[s]) if samples[s] else None
                    row[f"{s}_failed"] = failures[s]
                    row[f"{s}_cpu"] = statistics.median(cpu[s]) if cpu[s] else None
                    self.cpu_log.append({
                        "case": f"{size_mib}MiB/{n}/{bs}", "server": s,
                        **{k: [round(x, 3) for x in v] for k, v in (
                            ("seconds", samples[s]), ("server_cpu", cpu[s]),
                            ("clients_cpu", ccpu[s]), ("machine_idle", idle[s]))}})
                    # Paired: hpa/server within the same repetition, then the median. Less
                    # sensitive to outside load drifting between repetitions.
                    pairs = [h / x for h, x in zip(paired["tftpd-hpa"], paired[s], strict=False)
                             if h is not None and x is not None]
                    row[f"{s}_paired"] = statistics.median(pairs) if pairs else None
                row["mib"] = size_mib * n
                rows.append(row)
                print(self.format_row(row), flush=True)
        return rows

    def header(self) -> str:
        cols = ["file", "clients", "blksize"]
        for s in self.servers():
            cols += [f"{s} s", f"{s} MiB/s", f"{s} CPU s"]
            if s != "tftpd-hpa":
                cols += [f"{s}/hpa", f"{s}/hpa paired"]
        return " | ".join(cols) + "\n" + " | ".join("---" for _ in cols)

    def format_row(self, row: dict) -> str:
        cells = [row["file"], str(row["clients"]), str(row["blksize"])]
        hpa = row.get("tftpd-hpa")
        for s in self.servers():
            sec = row.get(s)
            fails = row.get(f"{s}_failed", 0)
            if sec is None:
                cells += [f"failed ({fails})", "-", "-"]
                if s != "tftpd-hpa":
                    cells += ["-", "-"]
                continue
            rate = row["mib"] / sec
            mark = f" ({fails} failed runs)" if fails else ""
            c = row.get(f"{s}_cpu")
            cells += [f"{sec:.3f}{mark}", f"{rate:.1f}", f"{c:.2f}" if c is not None else "-"]
            if s != "tftpd-hpa":
                cells.append(f"{hpa / sec:.2f}x" if hpa else "-")
                pr = row.get(f"{s}_paired")
                cells.append(f"{pr:.2f}x" if pr else "-")
        return " | ".join(cells)

    def counters(self) -> str:
        sys.path.insert(0, str(REPO))
        from appliance.db import Database, read_counters

        db = Database(f"sqlite:///{self.tmp / 'state' / 'appliance.db'}")
        try:
            return json.dumps(read_counters(db).get("tftp", {}))
        finally:
            db.dispose()

    def cleanup(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(5)
            print(f"# stopped {name} (pid {p.pid})", file=sys.stderr)
        for cg in self.cgroups.values():
            try:
                cg.rmdir()
            except OSError as exc:
                print(f"# cannot remove {cg}: {exc}", file=sys.stderr)
        for ns in self.ns_made:
            sh("ip", "netns", "del", ns, check=False)
        if not self.args.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--host")
    ap.add_argument("--file")
    ap.add_argument("--size")
    ap.add_argument("--n", type=int, default=1)
    ap.add_argument("--blksize", type=int, default=512)
    ap.add_argument("--outdir")
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--reps", type=int, default=3, help="runs per case and server (median)")
    ap.add_argument("--workers", type=int, default=0,
                    help="appliance tftp.workers (0: one per CPU)")
    ap.add_argument("--stock-tftpy", action="store_true",
                    help="also measure tftpy's unmodified TftpServer")
    ap.add_argument("--clients", type=int, action="append", default=[],
                    help="only the cases with this many clients (repeatable; e.g. "
                    "--clients 100 for quick iteration)")
    ap.add_argument("--no-big", action="store_true", help="skip the 32 MiB cases")
    ap.add_argument("--blksize-only", type=int, action="append", default=[],
                    help="only this blksize (repeatable: 512, 1468)")
    ap.add_argument("--case-timeout", type=float, default=180)
    ap.add_argument("--max-seconds", type=float, default=1500, help="whole-run time budget")
    ap.add_argument("--cpu-detail", action="store_true",
                    help="print per-run wall time, server CPU, clients' CPU and machine idle")
    ap.add_argument("--baseline", metavar="DIR",
                    help="also run the appliance from another source tree (e.g. a copy of "
                    "the previous commit) as server 'baseline', for A/B in the same run")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--server-cpu", type=int, metavar="PCT",
                    help="cap every server (all its processes) at PCT%% of one core with a "
                    "cgroup-v1 CPU quota (10 ms periods), so the clients do not set the pace")
    args = ap.parse_args()
    if args.server_cpu is not None and not 5 <= args.server_cpu <= 200:
        ap.error("--server-cpu must be between 5 and 200 (percent of one core)")
    if args.client:
        return client_main(args)
    if os.geteuid() != 0:
        print("run as root (network namespaces)", file=sys.stderr)
        return 2
    for tool in ("ip", "atftp", "in.tftpd"):
        if not shutil.which(tool):
            print(f"missing {tool}", file=sys.stderr)
            return 2
    def on_term(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    t_start = time.monotonic()
    bench = Bench(args)
    try:
        bench.setup()
        print(f"# load average before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} "
              f"{os.getloadavg()[2]:.2f}", flush=True)
        if args.server_cpu is not None:
            print(f"# every server capped at {args.server_cpu}% of one core (cgroup CPU "
                  "quota, 10 ms periods)", flush=True)
        print(f"# {os.cpu_count()} CPUs, appliance tftp.workers={args.workers} "
              f"(0 = one per CPU), {args.reps} reps, median; client: atftp, all clients "
              "started at once; MiB/s = clients x file size / wall time; CPU s = the "
              "server's CPU time (user+system, all its processes) per run; paired = "
              "median of per-repetition hpa/appliance time ratios", flush=True)
        print(bench.header(), flush=True)
        bench.run()
        print(f"# appliance counters: {bench.counters()}")
        if args.cpu_detail:
            for entry in bench.cpu_log:
                print("# cpu " + json.dumps(entry, separators=(",", ":")))
        print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
              f"took {time.monotonic() - t_start:.0f} s", flush=True)
    finally:
        bench.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
