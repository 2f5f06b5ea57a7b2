#!/usr/bin/env python3
"""Power benchmark: power status of N simulated BMCs in one sweep, the appliance vs ipmitool.

Starts ``--bmcs`` (200) OpenIPMI ``ipmi_sim`` BMCs on 127.0.0.1 (``tests/ipmisim.py``),
half of them "on", then for each ``--concurrency`` level times, ``--reps`` times:

- **sweep**: ``appliance.power.calls.sweep(accesses, "status", workers=C)`` in this
  process (IPMI driver over pyghmi, one login/logout per call, default CallPolicy);
- **ipmitool**: ``ipmitool -I lanplus -C 3 -H 127.0.0.1 -p PORT -U admin -E chassis power
  status`` once per BMC, C at a time (a thread pool running the subprocesses);
- **daemon** (unless ``--no-daemon``): ``appliance serve --only power`` with
  ``power.workers = C`` and polling off; N ``status`` requests are queued in one database
  transaction and the clock stops when the last one is finished in the database.

A call counts as a failure if it errs or reports a power state different from the one
the BMC's chassis control program holds (a failure is never a fast answer). Sweep and
ipmitool alternate which goes first in each repetition. The machine's load is printed
before and after; by default the run waits (up to ``--wait-load`` seconds) for the
1-minute load average to drop below ``--max-load`` first, and it holds
``/tmp/appliance-bench.lock`` (the lock the other benchmarks use) while it runs.

Run as root or not (ports are above 1024), from the repository root::

    python3 bench/power/run.py                       # 200 BMCs, C = 1 8 32 64, 3 reps
    python3 bench/power/run.py --concurrency 32 --reps 5 --no-daemon

Exit status 0 when the benchmark ran (whatever the figures), 2 when setup failed.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests import ipmisim  # noqa: E402

LOCK = "/tmp/appliance-bench.lock"
PASSWORD = "bench-Pw-7"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def loadavg() -> tuple[float, float, float]:
    a, b, c = Path("/proc/loadavg").read_text().split()[:3]
    return float(a), float(b), float(c)


def uptime_line() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


@dataclass
class Run:
    seconds: float
    failures: int
    slow: int = 0                     # calls over 1 s
    call_p50: float | None = None
    call_max: float | None = None
    errors: list[str] = field(default_factory=list)
    #: daemon only: seconds from queueing until the last request was claimed (running)
    claimed_all: float | None = None
    #: CPUs used on average by processes other than this benchmark's during the run
    others: float | None = None


@dataclass
class Case:
    concurrency: int
    runs: dict[str, list[Run]] = field(default_factory=dict)


# --- who used the CPUs -----------------------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy (all CPUs; steal counts as busy)."""
    f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return (user + nice + system + irq + softirq + steal) / TICK


def tree_cpu(pids: list[int]) -> float:
    """CPU seconds of these processes, their live descendants and their reaped children."""
    total = 0.0
    todo, seen = list(pids), set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15]) / TICK
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError, IndexError):
            pass
    return total


class CpuMeter:
    """CPU used by others during a run: machine busy time minus this process (and the
    ipmitool children it reaped), the ipmi_sim trees and the daemon's tree."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids

    def _ours(self) -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system + tree_cpu(self.pids)

    def __enter__(self) -> CpuMeter:
        self.t0, self.busy0, self.ours0 = time.monotonic(), machine_busy(), self._ours()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = max(1e-6, time.monotonic() - self.t0)
        others = (machine_busy() - self.busy0) - (self._ours() - self.ours0)
        self.others = max(0.0, others) / wall


# --- the three contenders --------------------------------------------------------------------

def run_sweep(bmcs: list[ipmisim.SimBmc], expected: list[str], workers: int) -> Run:
    from appliance.power.calls import CallPolicy, sweep

    accesses = [b.access() for b in bmcs]
    t0 = time.monotonic()
    outcomes = sweep(accesses, "status", workers=workers, policy=CallPolicy())
    seconds = time.monotonic() - t0
    errors = []
    for b, want, o in zip(bmcs, expected, outcomes, strict=True):
        got = o.result.get("power") if o.ok and isinstance(o.result, dict) else None
        if got != want:
            errors.append(f"BMC {b.index} port {b.port}: "
                          + (f"said {got!r}, is {want!r}" if o.ok else str(o.error)))
    durations = sorted(o.duration for o in outcomes)
    return Run(seconds, len(errors), slow=sum(d > 1.0 for d in durations),
               call_p50=statistics.median(durations), call_max=durations[-1],
               errors=errors[:5])


def run_ipmitool(bmcs: list[ipmisim.SimBmc], expected: list[str], workers: int) -> Run:
    env = dict(os.environ, IPMI_PASSWORD=PASSWORD)

    def one(b: ipmisim.SimBmc) -> tuple[bool, str, float]:
        t = time.monotonic()
        r = subprocess.run(b.ipmitool_cmd("chassis", "power", "status"), env=env,
                           capture_output=True, text=True, timeout=120, check=False)
        return r.returncode == 0, (r.stdout.strip() or r.stderr.strip()), time.monotonic() - t

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(one, bmcs))
    seconds = time.monotonic() - t0
    errors = []
    for b, want, (ok, text, _) in zip(bmcs, expected, results, strict=True):
        if not ok or text != f"Chassis Power is {want}":
            errors.append(f"BMC {b.index} port {b.port}: {text!r}")
    durations = sorted(d for _, _, d in results)
    return Run(seconds, len(errors), slow=sum(d > 1.0 for d in durations),
               call_p50=statistics.median(durations), call_max=durations[-1],
               errors=errors[:5])


class Daemon:
    """``appliance serve --only power`` on its own SQLite state dir, machines preloaded."""

    def __init__(self, work: Path, bmcs: list[ipmisim.SimBmc]) -> None:
        self.work = work
        self.bmcs = bmcs
        self.proc: subprocess.Popen | None = None
        self.state = work / "state"
        self.machine_ids: list[int] = []

    def prepare(self) -> None:
        from appliance.config import load_config
        from appliance.db import Database
        from appliance.models import Machine
        from appliance.power.control import BmcSettings, set_bmc

        self.state.mkdir(parents=True, exist_ok=True)
        self.write_config(32)
        config = load_config(str(self.config_path))
        db = Database(config.effective_database_url)
        db.migrate()
        with db.session() as session:
            for b in self.bmcs:
                m = Machine(mac=f"52:54:00:be:{b.index >> 8:02x}:{b.index & 0xff:02x}",
                            hostname=f"bench{b.index:03d}", state="ready")
                session.add(m)
                set_bmc(config, session, m, BmcSettings("ipmi", b.host, ipmisim.USER,
                                                        PASSWORD, b.port), "bench")
            session.flush()
            self.machine_ids = [m.id for m in session.query(Machine).order_by(Machine.id)]
        db.dispose()

    @property
    def config_path(self) -> Path:
        return self.work / "appliance.toml"

    def write_config(self, workers: int) -> None:
        self.config_path.write_text(
            f'state_dir = "{self.state}"\nlog_level = "WARNING"\n'
            f"[power]\nworkers = {workers}\npoll_interval = 0\n")

    def start(self, workers: int) -> None:
        self.write_config(workers)
        log_file = open(self.work / "appliance.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "--config", str(self.config_path),
             "serve", "--only", "power"], cwd=REPO, stdin=subprocess.DEVNULL,
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        log_file.close()
        # ready when it has run one request
        r = self.measure(self.machine_ids[:1], [self.expected()[0]], timeout=60)
        if r.failures:
            raise RuntimeError(f"the power part did not run a request: {r.errors}; log:\n"
                               + (self.work / "appliance.log").read_text()[-3000:])

    def expected(self) -> list[str]:
        return [b.power() for b in self.bmcs]

    def measure(self, machine_ids: list[int], expected: list[str],
                timeout: float = 600) -> Run:
        from sqlalchemy import func, select

        from appliance.db import Database
        from appliance.models import PowerRequest

        db = Database(f"sqlite:///{self.state / 'appliance.db'}")
        try:
            with db.session() as session:
                reqs = [PowerRequest(machine_id=mid, operation="status", args={},
                                     actor="bench", state="queued") for mid in machine_ids]
                session.add_all(reqs)
                session.flush()
                ids = [r.id for r in reqs]
            t0 = time.monotonic()               # committed: the daemon can see them
            deadline = t0 + timeout
            unfinished = (select(func.count()).select_from(PowerRequest)
                          .where(PowerRequest.id.between(min(ids), max(ids)),
                                 PowerRequest.state.in_(("queued", "running"))))
            while True:                          # a cheap poll: this shares the CPUs
                with db.session() as session:
                    left = session.scalar(unfinished)
                if not left:
                    seconds = time.monotonic() - t0
                    break
                if time.monotonic() > deadline:
                    return Run(time.monotonic() - t0, len(ids), errors=["timed out"])
                time.sleep(0.02)
            with db.session() as session:
                rows = list(session.execute(
                    select(PowerRequest.id, PowerRequest.state, PowerRequest.result,
                           PowerRequest.error, PowerRequest.created_at,
                           PowerRequest.started_at, PowerRequest.finished_at)
                    .where(PowerRequest.id.in_(ids)).order_by(PowerRequest.id)))
        finally:
            db.dispose()
        errors = []
        for row, want in zip(rows, expected, strict=True):
            got = (row.result or {}).get("power") if row.state == "succeeded" else None
            if got != want:
                errors.append(f"request {row.id}: {row.state} {got!r} {row.error or ''}")
        # the database's own clock (UTC, microseconds): claim span and per-request run time
        created = min(r.created_at for r in rows)
        runs = sorted((r.finished_at - r.started_at).total_seconds() for r in rows
                      if r.started_at and r.finished_at)
        claimed = max((r.started_at - created).total_seconds() for r in rows if r.started_at)
        return Run(seconds, len(errors),
                   call_p50=statistics.median(runs) if runs else None,
                   call_max=runs[-1] if runs else None, errors=errors[:5],
                   claimed_all=claimed)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None


# --- reporting ----------------------------------------------------------------------------------

def fmt(runs: list[Run]) -> tuple[str, float | None]:
    if not runs:
        return "not measured", None
    secs = [r.seconds for r in runs]
    med = statistics.median(secs)
    return f"{med:.2f} ({min(secs):.2f}-{max(secs):.2f})", med


def table(cases: list[Case], n: int, with_daemon: bool) -> str:
    head = ["C", "sweep s med (min-max)", "fail", "ipmitool s med (min-max)", "fail",
            "ipmitool/sweep"]
    if with_daemon:
        head += ["daemon s med (min-max)", "fail", "ipmitool/daemon"]
    head += ["sweep calls >1 s", "sweep call p50/max s", "ipmitool call p50/max s"]
    if with_daemon:
        head += ["daemon claimed->finished p50/max s", "daemon all claimed after s"]
    head += ["others' CPUs max"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for case in cases:
        sw, ip, dm = (case.runs.get(k, []) for k in ("sweep", "ipmitool", "daemon"))
        sw_s, sw_m = fmt(sw)
        ip_s, ip_m = fmt(ip)
        row = [str(case.concurrency), sw_s, str(sum(r.failures for r in sw)), ip_s,
               str(sum(r.failures for r in ip)),
               f"{ip_m / sw_m:.2f}x" if sw_m and ip_m else "-"]
        if with_daemon:
            dm_s, dm_m = fmt(dm)
            row += [dm_s, str(sum(r.failures for r in dm)) if dm else "-",
                    f"{ip_m / dm_m:.2f}x" if dm_m and ip_m else "-"]
        row += [str(sum(r.slow for r in sw)),
                "/".join(f"{statistics.median([getattr(r, a) for r in sw]):.3f}"
                         for a in ("call_p50", "call_max")) if sw else "-",
                "/".join(f"{statistics.median([getattr(r, a) for r in ip]):.3f}"
                         for a in ("call_p50", "call_max")) if ip else "-"]
        if with_daemon:
            dmv = [r for r in dm if r.call_p50 is not None]
            row += ["/".join(f"{statistics.median([getattr(r, a) for r in dmv]):.3f}"
                             for a in ("call_p50", "call_max")) if dmv else "-",
                    f"{statistics.median([r.claimed_all for r in dmv]):.2f}" if dmv else "-"]
        others = [r.others for r in sw + ip + dm if r.others is not None]
        row += [f"{max(others):.2f}" if others else "-"]
        lines.append(" | ".join(row))
    return "\n".join(lines) + (f"\n(N = {n} BMCs per sweep; failures summed over repetitions; "
                               "others' CPUs: average CPUs used by processes not started by "
                               "this benchmark during a run, the highest of the case's runs)")


def proc_usage(pids: list[int]) -> tuple[float, float]:
    """Total RSS (MiB) and CPU seconds of these processes and their reaped children (the
    chassis control programs ipmi_sim runs)."""
    rss = cpu = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) / 1024
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cpu += sum(int(f) for f in fields[11:15]) / tick
        except (OSError, IndexError, ValueError):
            pass
    return rss, cpu


# --- main -------------------------------------------------------------------------------------

def wait_for_quiet(max_load: float, wait: float) -> None:
    deadline = time.monotonic() + wait
    while loadavg()[0] > max_load:
        if time.monotonic() >= deadline:
            log(f"load still {loadavg()[0]:.2f} > {max_load} after {wait:.0f} s: running anyway")
            return
        log(f"load {loadavg()[0]:.2f} > {max_load}: waiting ({uptime_line()})")
        time.sleep(30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bmcs", type=int, default=200)
    ap.add_argument("--concurrency", default="1,8,32,64",
                    help="comma-separated worker counts (default 1,8,32,64)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-daemon", action="store_true", help="skip the appliance serve case")
    ap.add_argument("--max-load", type=float, default=1.0)
    ap.add_argument("--wait-load", type=float, default=900,
                    help="seconds to wait for --max-load before running anyway")
    ap.add_argument("--no-lock", action="store_true", help=f"do not take {LOCK}")
    ap.add_argument("--json", help="also write the raw figures here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]

    for tool in ("ipmi_sim", "ipmitool"):
        if shutil.which(tool) is None:
            log(f"{tool} not found (Debian packages openipmi, ipmitool)")
            return 2
    lock_fd = None
    if not args.no_lock:
        lock_fd = os.open(LOCK, os.O_CREAT | os.O_RDWR, 0o666)
        log(f"waiting for {LOCK} ...")
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
    wait_for_quiet(args.max_load, args.wait_load)

    have_daemon = True
    try:
        import appliance.power.worker  # noqa: F401
        from appliance.power.calls import sweep  # noqa: F401
    except ImportError as exc:
        if not args.no_daemon:
            log(f"appliance power part not importable ({exc}): daemon not measured")
        have_daemon = False
    with_daemon = have_daemon and not args.no_daemon

    work = Path(tempfile.mkdtemp(prefix="bench-power-"))
    before = uptime_line()
    print(f"# bench/power/run.py {' '.join(sys.argv[1:])}")
    print(f"# before: {before}; {os.cpu_count()} CPUs")
    cases: list[Case] = []
    bmcs: list[ipmisim.SimBmc] = []
    daemon: Daemon | None = None
    try:
        t0 = time.monotonic()
        bmcs = ipmisim.start_fleet(work / "fleet", args.bmcs, password=PASSWORD, timeout=60)
        startup = time.monotonic() - t0
        for b in bmcs[::2]:
            b.set_power(True)
        expected = [b.power() for b in bmcs]
        rss, cpu = proc_usage([b.pid for b in bmcs])
        print(f"# {len(bmcs)} ipmi_sim BMCs up (answering RMCP ping) in {startup:.2f} s; "
              f"total RSS {rss:.0f} MiB ({rss / len(bmcs):.1f} MiB each), "
              f"CPU so far {cpu:.2f} s")
        if with_daemon:
            daemon = Daemon(work / "daemon", bmcs)
            daemon.prepare()
        sim_pids = [b.pid for b in bmcs]
        # warm-up: imports, pyghmi's first sockets
        run_sweep(bmcs[:4], expected[:4], 4)
        for c in levels:
            case = Case(c, {"sweep": [], "ipmitool": [], "daemon": []})
            for rep in range(args.reps):
                order = ("sweep", "ipmitool") if rep % 2 == 0 else ("ipmitool", "sweep")
                for what in order:
                    fn = run_sweep if what == "sweep" else run_ipmitool
                    with CpuMeter(sim_pids) as meter:
                        r = fn(bmcs, expected, c)
                    r.others = meter.others
                    case.runs[what].append(r)
                    log(f"C={c} rep {rep + 1} {what}: {r.seconds:.2f} s, {r.failures} failed"
                        + (f" {r.errors[:2]}" if r.errors else "")
                        + f"; load {loadavg()[0]:.2f}, others used {r.others:.2f} CPUs")
            if daemon is not None:
                daemon.start(c)
                try:
                    for rep in range(args.reps):
                        assert daemon.proc is not None
                        with CpuMeter([*sim_pids, daemon.proc.pid]) as meter:
                            r = daemon.measure(daemon.machine_ids, expected)
                        r.others = meter.others
                        case.runs["daemon"].append(r)
                        log(f"C={c} rep {rep + 1} daemon: {r.seconds:.2f} s, {r.failures} "
                            f"failed{' ' + str(r.errors[:2]) if r.errors else ''}; all "
                            f"claimed after {r.claimed_all:.2f} s, claimed->finished p50 "
                            f"{r.call_p50:.3f} s; load {loadavg()[0]:.2f}, others used "
                            f"{r.others:.2f} CPUs")
                finally:
                    daemon.stop()
            cases.append(case)
        rss, cpu = proc_usage([b.pid for b in bmcs])
        print(f"# ipmi_sim total CPU over the run {cpu:.1f} s, RSS {rss:.0f} MiB")
    except Exception as exc:  # noqa: BLE001
        log(f"setup or run failed: {type(exc).__name__}: {exc}")
        if not cases:
            return 2
    finally:
        if daemon is not None:
            daemon.stop()
        ipmisim.stop_fleet(bmcs)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"work directory kept: {work}")
        if lock_fd is not None:
            os.close(lock_fd)
    print(f"# after: {uptime_line()}")
    if not with_daemon:
        print("# daemon (appliance serve --only power): not measured"
              + ("" if have_daemon else " (power part not present)"))
    print(table(cases, args.bmcs, with_daemon))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"argv": sys.argv[1:], "before": before, "bmcs": args.bmcs,
             "cases": [{"concurrency": c.concurrency,
                        "runs": {k: [r.__dict__ for r in v] for k, v in c.runs.items()}}
                       for c in cases]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
