"""One BMC operation with a deadline and bounded retries, and sweeps over many BMCs.

Every attempt runs in its own daemon thread and is waited for with a deadline, so a
driver or library that blocks longer than its own socket timeouts (or a BMC that
trickles answers) cannot hold the caller: the attempt is abandoned and reported as a
timeout. Only transient failures (timeout, connection) are retried, with a doubling
backoff; a wrong password or a refused command is final at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from appliance.power.driver import (
    BOOT_DEVICES,
    BOOT_MODES,
    CONFIG,
    POWER_ACTIONS,
    TIMEOUT,
    BmcAccess,
    BmcError,
    PowerDriver,
)

#: Operations and what they do; the worker, the CLI and the API use these names.
DRIVERS = ("ipmi", "redfish")
OPERATIONS = ("status", "power", "boot", "get-boot", "identify", "validate")


@dataclass(frozen=True)
class CallPolicy:
    #: Seconds one attempt may take (login included).
    timeout: float = 10.0
    attempts: int = 3
    #: Seconds before the second attempt; doubles for each further one.
    backoff: float = 1.0


@dataclass
class CallOutcome:
    ok: bool
    result: Any = None
    error: BmcError | None = None
    attempts: int = 0
    duration: float = 0.0
    #: One line per failed attempt, for the event's details.
    failures: list[str] = field(default_factory=list)
    #: Attempts abandoned at their deadline whose threads had not ended yet.
    stragglers: list[threading.Thread] = field(default_factory=list, repr=False)


def driver_class(name: str) -> type[PowerDriver]:
    if name == "ipmi":
        from appliance.power.ipmi import IpmiDriver

        return IpmiDriver
    if name == "redfish":
        from appliance.power.redfish import RedfishDriver

        return RedfishDriver
    raise BmcError(CONFIG, f"unknown BMC driver {name!r} (drivers: {', '.join(DRIVERS)})")


def check_operation(operation: str, args: dict[str, Any]) -> dict[str, Any]:
    """Validate and normalise an operation's arguments; raises ValueError naming the field."""
    if operation not in OPERATIONS:
        raise ValueError(f"operation: {operation!r} is not one of {', '.join(OPERATIONS)}")
    if operation == "power":
        action = args.get("action")
        if action not in POWER_ACTIONS:
            raise ValueError(f"action: {action!r} is not one of {', '.join(POWER_ACTIONS)}")
        return {"action": action}
    if operation == "boot":
        device, mode = args.get("device"), args.get("mode", "bios")
        persistent = args.get("persistent", False)
        if device not in BOOT_DEVICES:
            raise ValueError(f"device: {device!r} is not one of {', '.join(BOOT_DEVICES)}")
        if mode not in BOOT_MODES:
            raise ValueError(f"mode: {mode!r} is not one of {', '.join(BOOT_MODES)}")
        if not isinstance(persistent, bool):
            raise ValueError(f"persistent: expected true or false, got {persistent!r}")
        return {"device": device, "persistent": persistent, "mode": mode}
    if operation == "identify":
        on = args.get("on", True)
        if not isinstance(on, bool):
            raise ValueError(f"on: expected true or false, got {on!r}")
        return {"on": on}
    return {}


def _not_idempotent(operation: str, args: dict[str, Any]) -> bool:
    return operation == "power" and args.get("action") in ("cycle", "reset")


def _perform(driver: PowerDriver, operation: str, args: dict[str, Any]) -> Any:
    if operation == "validate":
        driver.validate()
        return {"power": driver.get_power_state()}
    if operation == "status":
        return {"power": driver.get_power_state()}
    if operation == "power":
        driver.set_power_state(args["action"])
        return {"action": args["action"]}
    if operation == "boot":
        driver.set_boot_device(args["device"], args["persistent"], args["mode"])
        return dict(args)
    if operation == "get-boot":
        boot = driver.get_boot_device()
        return {"device": boot.device, "persistent": boot.persistent, "mode": boot.mode}
    if operation == "identify":
        driver.identify(args["on"])
        return {"on": args["on"]}
    raise BmcError(CONFIG, f"unknown operation {operation!r}")


def _attempt(access: BmcAccess, operation: str, args: dict[str, Any],
             timeout: float, stragglers: list[threading.Thread]) -> Any:
    """One attempt in a daemon thread, abandoned (as a timeout) after ``timeout``; an
    abandoned thread goes to ``stragglers``, so the caller can wait for it to end before
    the BMC gets its next call."""
    box: dict[str, Any] = {}
    done = threading.Event()

    def work() -> None:
        driver = None
        try:
            driver = driver_class(access.driver)(access, timeout)
            box["result"] = _perform(driver, operation, args)
        except BmcError as exc:
            box["error"] = exc
        except Exception as exc:  # noqa: BLE001 - a library bug is a BMC error, not a crash
            box["error"] = BmcError("protocol", f"{type(exc).__name__}: {exc}")
        finally:
            if driver is not None:
                driver.close()
            done.set()

    thread = threading.Thread(target=work, name=f"bmc-{access.address}:{access.port}",
                              daemon=True)
    try:
        thread.start()
    except RuntimeError as exc:  # no thread left: an error, not a crash
        raise BmcError("internal", f"cannot start a BMC call: {exc}") from None
    if not done.wait(timeout):
        stragglers.append(thread)
        raise BmcError(TIMEOUT, f"no complete answer from {access.describe()} "
                                f"within {timeout:g} s")
    if "error" in box:
        raise _scrubbed(box["error"], access.password)
    return box.get("result")


def _scrubbed(error: BmcError, password: str) -> BmcError:
    """The error with the password blanked, should a library or a BMC echo it."""
    text = str(error.args[0]) if error.args else ""
    if len(password) >= 4 and password in text:
        return BmcError(error.kind, text.replace(password, "********"))
    return error


def wait_for_stragglers(outcome: CallOutcome, limit: float) -> bool:
    """Wait (at most ``limit`` s in all) for abandoned attempts to end; False if one is
    still running. Until then the BMC may still act on an earlier call."""
    deadline = time.monotonic() + limit
    for thread in outcome.stragglers:
        thread.join(max(0.0, deadline - time.monotonic()))
    outcome.stragglers = [t for t in outcome.stragglers if t.is_alive()]
    return not outcome.stragglers


def run_call(access: BmcAccess, operation: str, args: dict[str, Any] | None = None,
             policy: CallPolicy | None = None,
             sleep: Callable[[float], None] = time.sleep) -> CallOutcome:
    """Run ``operation`` against one BMC: at most ``policy.attempts`` attempts."""
    policy = policy or CallPolicy()
    started = time.monotonic()
    outcome = CallOutcome(ok=False)
    try:
        args = check_operation(operation, args or {})
    except ValueError as exc:
        outcome.error = BmcError(CONFIG, str(exc))
        return outcome
    delay = policy.backoff
    for attempt in range(1, max(1, policy.attempts) + 1):
        outcome.attempts = attempt
        if outcome.stragglers:  # never two calls to one BMC at once
            wait_for_stragglers(outcome, policy.timeout)
        try:
            outcome.result = _attempt(access, operation, args, policy.timeout,
                                      outcome.stragglers)
            outcome.ok = True
            outcome.error = None
            break
        except BmcError as exc:
            outcome.error = exc
            outcome.failures.append(f"attempt {attempt}: {exc}")
            if not exc.transient or attempt >= policy.attempts:
                break
            if exc.kind == TIMEOUT and _not_idempotent(operation, args):
                # The BMC may have acted before its answer was lost: a second cycle or
                # reset would reboot the machine twice. Reported, not repeated.
                outcome.failures.append("not retried: a repeated cycle or reset could "
                                        "reboot the machine twice")
                break
            sleep(delay)
            delay *= 2
    outcome.duration = time.monotonic() - started
    return outcome


def sweep(accesses: list[BmcAccess], operation: str = "status",
          args: dict[str, Any] | None = None, workers: int = 32,
          policy: CallPolicy | None = None) -> list[CallOutcome]:
    """``operation`` on every BMC, ``workers`` at a time; outcomes in input order."""
    if not accesses:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(accesses))),
                            thread_name_prefix="bmc-sweep") as pool:
        return list(pool.map(lambda a: run_call(a, operation, args, policy), accesses))
