"""The ``lifecycle`` part of ``appliance serve``: phase time limits and contract checks.

Once a second it fails machines whose phase outlived its limit (``[lifecycle]``
``*_timeout``), and runs the post-provision contract check (``contract.py``, over SSH)
for machines that phoned home, off every request path, a few at a time. A check that
cannot reach the machine yet (sshd still starting, address not answering) is retried
every ``RETRY_INTERVAL`` seconds until the contract phase times out; a check that finds
the contract broken fails the machine at once with the reason.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import select

from appliance.catalog import Catalog, load_catalog
from appliance.config import Config
from appliance.db import Database, publish_counters
from appliance.lifecycle import operations
from appliance.lifecycle.contract import check_contract
from appliance.lifecycle.states import CONTRACT, INSTALLING, LifecycleError
from appliance.machinefiles import machine_address
from appliance.models import Machine
from appliance.stopsignals import stop_on_signals

log = logging.getLogger("appliance.lifecycle")

ROUND_INTERVAL = 1.0
#: Seconds between contract check attempts on one machine that was not reachable yet.
RETRY_INTERVAL = 10.0
#: Contract checks at once.
CHECK_WORKERS = 4
#: Seconds one SSH check may take.
CHECK_TIMEOUT = 20.0


class LifecycleWorker:
    def __init__(self, config: Config, db: Database, catalog: Catalog | None = None) -> None:
        self.config = config
        self.db = db
        self.catalog = catalog or load_catalog(config)
        self.pool = ThreadPoolExecutor(max_workers=CHECK_WORKERS,
                                       thread_name_prefix="contract")
        self.lock = threading.Lock()
        #: machine id -> monotonic time its next check may start (absent: now)
        self.next_check: dict[int, float] = {}
        self.checking: set[int] = set()
        self.counts = {"checks": 0, "passed": 0, "failed": 0, "retried": 0, "timed_out": 0}

    def expire(self) -> None:
        with self.db.session() as session:
            failed = operations.expire_phases(self.config, session)
        for name in failed:
            log.warning("%s: phase timed out, machine failed", name)
        self.counts["timed_out"] += len(failed)

    def due_checks(self, now: float) -> list[dict[str, Any]]:
        """What to check for each machine waiting in installing/contract, now due."""
        jobs = []
        with self.db.session() as session:
            waiting = session.scalars(select(Machine).where(
                Machine.state == INSTALLING, Machine.phase == CONTRACT).order_by(Machine.id))
            for machine in waiting:
                with self.lock:
                    if machine.id in self.checking or self.next_check.get(machine.id, 0) > now:
                        continue
                    self.checking.add(machine.id)
                jobs.append(self._job(session, machine))
        return jobs

    def _job(self, session: Any, machine: Machine) -> dict[str, Any]:
        job: dict[str, Any] = {"id": machine.id, "serial": machine.state_serial,
                               "label": operations.label(machine),
                               "address": machine_address(session, machine),
                               "host_keys": list((machine.ssh_host_keys or {}).values())}
        try:
            params = operations.deployment_params(session, self.catalog, machine)
            job["keys"] = [str(k) for k in params.get("ssh_authorized_keys") or []]
        except LifecycleError as exc:
            job["error"] = str(exc)
        return job

    def run_check(self, job: dict[str, Any]) -> None:
        try:
            self._check(job)
        except Exception:  # noqa: BLE001 - one machine's check must not stop the part
            log.exception("contract check of %s", job["label"])
            with self.lock:
                self.next_check[job["id"]] = time.monotonic() + RETRY_INTERVAL
        finally:
            with self.lock:
                self.checking.discard(job["id"])

    def _check(self, job: dict[str, Any]) -> None:
        lc = self.config.lifecycle
        if job.get("error") or not job["address"] or not job["keys"]:
            reason = job.get("error") or (
                "the machine has no address (no lease or reservation)" if not job["address"]
                else "the deployment has no ssh_authorized_keys to check")
            result_ok, retryable, checks = False, False, {"error": reason}
        else:
            self.counts["checks"] += 1
            result = check_contract(job["address"], job["host_keys"], job["keys"],
                                    user=lc.contract_user, port=lc.contract_ssh_port,
                                    timeout=CHECK_TIMEOUT)
            result_ok, reason, checks = result.ok, result.reason, dict(result.checks)
            retryable = bool(checks.get("retryable"))
        with self.db.session() as session:
            machine = session.get(Machine, job["id"])
            if machine is None or machine.state_serial != job["serial"]:
                return  # reimaged, decommissioned or timed out meanwhile
            if result_ok:
                operations.contract_passed(self.config, session, machine, checks)
                self.counts["passed"] += 1
                log.info("%s: contract confirmed, ready", job["label"])
            elif retryable:
                operations.contract_retry(session, machine, reason, checks)
                self.counts["retried"] += 1
                with self.lock:
                    self.next_check[job["id"]] = time.monotonic() + RETRY_INTERVAL
            else:
                operations.contract_failed(self.config, session, machine, reason, checks)
                self.counts["failed"] += 1
                log.warning("%s: contract check failed: %s", job["label"], reason)

    def serve(self, stop: threading.Event) -> None:
        next_beat = 0.0
        while not stop.is_set():
            try:
                now = time.monotonic()
                if now >= next_beat:
                    next_beat = now + 2.0
                    publish_counters(self.db, "lifecycle",
                                     {"heartbeat": int(time.time()), **self.counts})
                self.expire()
                for job in self.due_checks(time.monotonic()):
                    self.pool.submit(self.run_check, job)
            except Exception:  # noqa: BLE001 - a database hiccup is retried next round
                log.exception("lifecycle loop")
            stop.wait(ROUND_INTERVAL)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def run(config: Config, db: Database, stop: threading.Event | None = None) -> None:
    """Run the lifecycle part until SIGTERM/SIGINT or ``stop``."""
    stop = stop if stop is not None else threading.Event()
    worker = LifecycleWorker(config, db)
    lc = config.lifecycle
    log.info("lifecycle: phase limits power %d s, boot %d s, installer %d s, first boot %d s, "
             "contract %d s (0: none); contract checks as %s on port %d", lc.power_timeout,
             lc.boot_timeout, lc.installer_timeout, lc.first_boot_timeout, lc.contract_timeout,
             lc.contract_user, lc.contract_ssh_port)
    with stop_on_signals(stop, "lifecycle", log):
        try:
            worker.serve(stop)
        finally:
            worker.close()
            log.info("lifecycle stopped")
