"""The ``power`` part: runs queued BMC requests on a worker pool and polls power state.

- Requests run in the order they were queued, one at a time per machine (a BMC handles
  concurrent sessions badly, and "boot pxe" must land before "power cycle"), and up to
  ``[power] workers`` machines at once, so one slow BMC holds only its own machine.
- Each request is claimed with a conditional UPDATE (queued -> running) only when a
  worker is free, so a request is never run twice. Run one power part per database:
  the per-machine ordering is kept inside one process.
- Every outcome is written to the request row and as one event (who asked, what, the
  result or error, attempts, duration).
- Every ``poll_interval`` seconds each machine with a BMC and nothing in flight gets a
  status call; a change (or the BMC becoming unreachable or reachable again) is an
  event, an unchanged reading is not.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import object_session

from appliance.config import Config
from appliance.db import Database, publish_counters
from appliance.lifecycle import record_event
from appliance.lifecycle.operations import power_request_ended
from appliance.lifecycle.states import LifecycleError
from appliance.models import Machine, PowerRequest, utcnow
from appliance.power.calls import CallOutcome, CallPolicy, run_call, wait_for_stragglers
from appliance.power.control import PowerError, bmc_access, machine_label, persistence
from appliance.power.driver import CONFIG, BmcAccess, BmcError
from appliance.power.stats import POLL, REQUEST, CallStats
from appliance.stopsignals import stop_on_signals

log = logging.getLogger("appliance.power")

CLAIM_INTERVAL = 0.2
#: Seconds between the part's heartbeats (the CLI checks a power part is running).
HEARTBEAT_INTERVAL = 2.0
#: How long (x call_timeout) a machine stays busy waiting for an abandoned attempt.
STRAGGLER_WAIT_FACTOR = 3
#: An abandoned attempt still running this long (x call_timeout) is stuck for good:
#: the BMC library is wedged (see ``ipmi._one_pyghmi_session_lock``), so the part exits
#: and the daemon starts a fresh one rather than let every later call time out.
WEDGED_FACTOR = 10
#: Exit status of a power part that gave up on a wedged BMC library.
EXIT_WEDGED = 3
POLLER = "poller"
#: Power state after a successful action, until the next poll says otherwise.
STATE_AFTER = {"on": "on", "off": "off", "cycle": "on", "reset": "on"}


def _describe(operation: str, args: dict[str, Any]) -> str:
    if operation == "power":
        return f"power {args.get('action')}"
    if operation == "boot":
        how = persistence(bool(args.get("persistent")))
        return f"boot {args.get('device')} ({how}, {args.get('mode')})"
    if operation == "identify":
        return f"identify {'on' if args.get('on') else 'off'}"
    return operation


class PowerPartWedged(RuntimeError):
    """Calls stuck inside the BMC library: only a new process can recover."""


class PowerWorker:
    def __init__(self, config: Config, db: Database) -> None:
        self.config = config
        self.db = db
        self.policy = CallPolicy(timeout=config.power.call_timeout,
                                 attempts=config.power.attempts, backoff=config.power.backoff)
        self.pool = ThreadPoolExecutor(max_workers=config.power.workers,
                                       thread_name_prefix="power")
        self.busy: set[int] = set()
        self.lock = threading.Lock()
        self.next_poll: dict[int, float] = {}
        self.futures: set[Future[None]] = set()
        #: Counts and durations of the calls made, published with the heartbeat.
        self.stats = CallStats()
        #: Set when a call ends, so the loop claims the next request at once.
        self.wake = threading.Event()
        #: Abandoned attempts that outlived the straggler wait, with when they were
        #: given up on; checked by :meth:`wedged_for`.
        self.stuck: list[tuple[threading.Thread, float]] = []

    # -- startup --------------------------------------------------------------------

    def recover(self) -> int:
        """Requests left ``running`` by a previous run have an unknown outcome: fail them."""
        with self.db.session() as session:
            stale = list(session.scalars(
                select(PowerRequest).where(PowerRequest.state == "running")))
            for req in stale:
                req.state = "failed"
                req.error_kind = "unknown"
                req.error = ("the power part stopped while this call was in flight; whether "
                             "the BMC acted is unknown")
                req.finished_at = utcnow()
                record_event(session, req.machine, "power", "power-request-failed",
                             f"{_describe(req.operation, req.args)}: outcome unknown "
                             "(power part restarted)", details={"request": req.id})
        return len(stale)

    # -- requests -------------------------------------------------------------------

    def claim_and_submit(self) -> int:
        """Start every queued request whose machine has nothing in flight."""
        started = 0
        with self.db.session() as session:
            queued = list(session.execute(
                select(PowerRequest.id, PowerRequest.machine_id)
                .where(PowerRequest.state == "queued").order_by(PowerRequest.id)))
        seen: set[int] = set()
        for request_id, machine_id in queued:
            if machine_id in seen:
                continue  # an older request of this machine goes first
            seen.add(machine_id)
            if self.in_flight() >= self.config.power.workers:
                break  # claimed means started: leave the rest queued
            with self.lock:
                if machine_id in self.busy:
                    continue
                self.busy.add(machine_id)
            if not self._claim(request_id):
                self._release(machine_id)
                continue
            self._submit(self._run_request, request_id, machine_id)
            started += 1
        return started

    def _claim(self, request_id: int) -> bool:
        with self.db.session() as session:
            claimed = session.execute(
                update(PowerRequest)
                .where(PowerRequest.id == request_id, PowerRequest.state == "queued")
                .values(state="running", started_at=utcnow()))
            return bool(claimed.rowcount)

    def in_flight(self) -> int:
        with self.lock:
            return len(self.busy)

    def _submit(self, fn: Any, *args: Any) -> None:
        future = self.pool.submit(fn, *args)
        self.futures.add(future)
        future.add_done_callback(self.futures.discard)

    def _settle(self, outcome: CallOutcome, machine_id: int) -> None:
        """Keep the machine busy until abandoned attempts have really ended, so its next
        call cannot overlap (or be undone by) a late one."""
        if outcome.stragglers and not wait_for_stragglers(
                outcome, STRAGGLER_WAIT_FACTOR * self.policy.timeout):
            log.warning("machine %d: a BMC call abandoned at its deadline is still running "
                        "after %g s more; releasing the machine anyway", machine_id,
                        STRAGGLER_WAIT_FACTOR * self.policy.timeout)
            since = time.monotonic() - STRAGGLER_WAIT_FACTOR * self.policy.timeout
            with self.lock:
                self.stuck.extend((thread, since) for thread in outcome.stragglers)

    def wedged_for(self, now: float) -> float:
        """Seconds the oldest still-running abandoned attempt has been stuck past its
        deadline (0 if none): past ``WEDGED_FACTOR`` x call_timeout, no BMC answer can
        explain it."""
        with self.lock:
            self.stuck = [(t, since) for t, since in self.stuck if t.is_alive()]
            return max((now - since for _, since in self.stuck), default=0.0)

    def _release(self, machine_id: int) -> None:
        with self.lock:
            self.busy.discard(machine_id)
        self.wake.set()  # a worker is free: claim the next request now, not next round

    def _access(self, machine: Machine) -> BmcAccess | PowerError:
        """The machine's BMC access, or why there is none (settings, key file)."""
        try:
            return bmc_access(self.config, machine)
        except PowerError as exc:
            return exc

    def _call(self, access: BmcAccess | PowerError, operation: str,
              args: dict[str, Any], source: str = REQUEST) -> CallOutcome:
        if isinstance(access, PowerError):
            outcome = CallOutcome(ok=False, error=BmcError(CONFIG, str(access)))
        else:
            outcome = run_call(access, operation, args, self.policy)
        self.stats.observe(source, operation, outcome)
        return outcome

    def _run_request(self, request_id: int, machine_id: int) -> None:
        try:
            with self.db.session() as session:
                req = session.get(PowerRequest, request_id)
                assert req is not None
                operation, args, actor = req.operation, dict(req.args or {}), req.actor
                access = self._access(req.machine)
            outcome = self._call(access, operation, args)
            self._finish_request(request_id, operation, args, actor, outcome)
            self._settle(outcome, machine_id)
        except Exception:  # noqa: BLE001 - one request's failure must not stop the part
            log.exception("power request %d failed unexpectedly", request_id)
            with self.db.session() as session:
                session.execute(update(PowerRequest).where(PowerRequest.id == request_id)
                                .values(state="failed", error_kind="internal",
                                        error="internal error; see the appliance log",
                                        finished_at=utcnow()))
        finally:
            self._release(machine_id)

    def _finish_request(self, request_id: int, operation: str, args: dict[str, Any],
                        actor: str, outcome: CallOutcome) -> None:
        what = _describe(operation, args)
        with self.db.session() as session:
            req = session.get(PowerRequest, request_id)
            assert req is not None
            machine = req.machine
            req.attempts = outcome.attempts
            req.finished_at = utcnow()
            details = {"request": request_id, "operation": operation, "args": args,
                       "requested_by": actor, "ok": outcome.ok,
                       "attempts": outcome.attempts,
                       "duration_s": round(outcome.duration, 3)}
            if outcome.ok:
                req.state, req.result = "succeeded", outcome.result
                details["result"] = outcome.result
                self._note_power(machine, operation, args, outcome.result)
                message = f"{what}: done in {outcome.duration:.1f} s"
                if operation == "status":
                    message = f"power status: {outcome.result.get('power')}"
                record_event(session, machine, actor, "power", message, details)
                log.info("%s %s (by %s): ok in %.2f s", machine_label(machine), what, actor,
                         outcome.duration)
            else:
                assert outcome.error is not None
                req.state = "failed"
                req.error, req.error_kind = str(outcome.error.args[0]), outcome.error.kind
                details.update(error=req.error, error_kind=req.error_kind,
                               failures=outcome.failures)
                record_event(session, machine, actor, "power-failed",
                             f"{what} failed after {outcome.attempts} attempt(s), "
                             f"{outcome.duration:.1f} s: {outcome.error}", details)
                self._cancel_later(session, machine, request_id, what)
                log.warning("%s %s (by %s) failed: %s", machine_label(machine), what, actor,
                            outcome.error)
            session.flush()
            try:  # a reimage waits for its requests; a lost race must not undo this outcome
                with session.begin_nested():
                    power_request_ended(self.config, session, req)
            except LifecycleError as exc:
                log.warning("%s: %s", machine_label(machine), exc)

    @staticmethod
    def _cancel_later(session: Any, machine: Machine, request_id: int, what: str) -> None:
        """Requests queued after a failed one were asked for as a sequence (``boot pxe``
        then ``power cycle``): running the rest would reboot into the wrong device."""
        later = list(session.scalars(select(PowerRequest).where(
            PowerRequest.machine_id == machine.id, PowerRequest.state == "queued",
            PowerRequest.id > request_id)))
        for req in later:
            req.state, req.finished_at = "cancelled", utcnow()
            req.error = f"cancelled: request {request_id} ({what}) before it failed"
        if later:
            record_event(session, machine, "power", "power-cancelled",
                         f"{len(later)} queued request(s) cancelled because {what} failed",
                         {"requests": [r.id for r in later], "failed_request": request_id})

    @staticmethod
    def _note_power(machine: Machine, operation: str, args: dict[str, Any],
                    result: Any) -> None:
        if operation in ("status", "validate"):
            _record_reading(object_session(machine), machine, "power", result.get("power"))
        elif operation == "power" and args.get("action") in STATE_AFTER:
            machine.power_state = STATE_AFTER[args["action"]]
            machine.power_checked_at, machine.power_error = utcnow(), None

    # -- polling --------------------------------------------------------------------

    def poll_due(self, now: float) -> int:
        interval = self.config.power.poll_interval
        if interval <= 0:
            return 0
        with self.db.session() as session:
            machines = list(session.execute(
                select(Machine.id).where(Machine.bmc_driver.is_not(None))))
        started = 0
        # Polls use at most half the workers, so operators' requests always find one.
        poll_slots = max(1, self.config.power.workers // 2)
        for (machine_id,) in machines:
            # The first poll of each machine is spread over one interval, not all at once.
            due = self.next_poll.setdefault(machine_id,
                                            now + random.uniform(0, min(interval, 10)))
            if due > now:
                continue
            if self.in_flight() >= poll_slots:
                break
            with self.lock:
                if machine_id in self.busy:
                    continue
                self.busy.add(machine_id)
            self.next_poll[machine_id] = now + interval
            self._submit(self._poll_machine, machine_id)
            started += 1
        return started

    def _poll_machine(self, machine_id: int) -> None:
        try:
            with self.db.session() as session:
                machine = session.get(Machine, machine_id)
                if machine is None or not machine.bmc_driver:
                    return
                access = self._access(machine)
            outcome = self._call(access, "status", {}, source=POLL)
            self._record_poll(machine_id, outcome)
            self._settle(outcome, machine_id)
        except Exception:  # noqa: BLE001
            log.exception("power poll of machine %d failed unexpectedly", machine_id)
        finally:
            self._release(machine_id)

    def _record_poll(self, machine_id: int, outcome: CallOutcome) -> None:
        with self.db.session() as session:
            machine = session.get(Machine, machine_id)
            if machine is None:
                return
            details = {"attempts": outcome.attempts, "duration_s": round(outcome.duration, 3)}
            if outcome.ok:
                _record_reading(session, machine, POLLER, outcome.result.get("power"),
                                details)
                return
            assert outcome.error is not None
            error = str(outcome.error)
            # one event per kind of failure, not per changing message text
            if (machine.power_error or "").split(":", 1)[0] != outcome.error.kind:
                record_event(session, machine, POLLER, "bmc-unreachable",
                             f"power status poll failed: {error}",
                             {**details, "failures": outcome.failures})
            machine.power_error, machine.power_checked_at = error, utcnow()

    # -- loop -----------------------------------------------------------------------

    def serve(self, stop: threading.Event) -> None:
        recovered = self.recover()
        if recovered:
            log.warning("%d power request(s) from a previous run marked failed (outcome "
                        "unknown)", recovered)
        next_beat = 0.0
        while not stop.is_set():
            try:
                now = time.monotonic()
                if now >= next_beat:
                    next_beat = now + HEARTBEAT_INTERVAL
                    publish_counters(self.db, "power", {"heartbeat": int(time.time()),
                                                        "in_flight": self.in_flight(),
                                                        **self.stats.snapshot()})
                self.claim_and_submit()
                self.poll_due(time.monotonic())
                stuck = self.wedged_for(time.monotonic())
                if stuck > WEDGED_FACTOR * self.policy.timeout:
                    raise PowerPartWedged(
                        f"a BMC call has been stuck for {stuck:.0f} s past its deadline "
                        "(the IPMI library is wedged); exiting so the daemon starts a "
                        "fresh power part")
            except PowerPartWedged:
                raise
            except Exception:  # noqa: BLE001 - a database hiccup is retried next round
                log.exception("power loop")
            self.wake.wait(CLAIM_INTERVAL)
            self.wake.clear()

    def close(self, grace: float = 15.0) -> None:
        """Let calls in flight finish (each is bounded by its policy) before exiting."""
        deadline = time.monotonic() + grace
        for future in list(self.futures):
            try:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001
                pass
        self.pool.shutdown(wait=False, cancel_futures=True)


def _record_reading(session: Any, machine: Machine, actor: str, new: str | None,
                    details: dict[str, Any] | None = None) -> None:
    """A power state the BMC reported (poll or operator's status): a change, or a BMC
    answering again after failing, is an event; the same state again is not."""
    if machine.power_error:
        record_event(session, machine, actor, "bmc-reachable",
                     f"BMC answers again; power is {new}", details)
    elif machine.power_state != new:
        before = machine.power_state or "unknown"
        record_event(session, machine, actor, "power-changed",
                     f"power {before} -> {new} (seen on the BMC)", details)
    machine.power_state, machine.power_error = new, None
    machine.power_checked_at = utcnow()


def run(config: Config, db: Database, stop: threading.Event | None = None) -> None:
    """Run the power part until SIGTERM/SIGINT or ``stop``."""
    stop = stop if stop is not None else threading.Event()
    worker = PowerWorker(config, db)
    log.info("power: %d workers, call timeout %g s x %d attempts, poll every %s",
             config.power.workers, config.power.call_timeout, config.power.attempts,
             f"{config.power.poll_interval} s" if config.power.poll_interval else "(off)")
    with stop_on_signals(stop, "power", log):
        try:
            worker.serve(stop)
        except PowerPartWedged as exc:
            log.error("power: %s", exc)
            # Stuck threads would keep the process alive: end it now. Requests it was
            # running are failed as "outcome unknown" by the next part's recover().
            logging.shutdown()
            os._exit(EXIT_WEDGED)
        finally:
            worker.close()
            log.info("power stopped")
