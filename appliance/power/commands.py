"""CLI: ``appliance machine bmc``, ``appliance power``, ``appliance boot``, ``appliance
identify``.

The commands queue a request (:func:`appliance.power.control.request`) that the
``power`` part of the running daemon executes, then wait for its outcome: exit 0 when
the BMC did it, 1 with the reason when it did not, 2 when the request is refused.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from typing import Any

from appliance import profiles
from appliance.config import Config
from appliance.db import Database
from appliance.inventory import as_dict
from appliance.power import control
from appliance.power.driver import BOOT_DEVICES, BOOT_MODES, POWER_ACTIONS

#: Seconds the CLI waits for a request (a call may take attempts x timeout + backoff).
DEFAULT_WAIT = 120.0


def cli_actor() -> str:
    return "cli:" + (os.environ.get("SUDO_USER") or getpass.getuser())


def _add_wait_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-wait", action="store_true",
                   help="queue the request and print its id without waiting")
    p.add_argument("--wait", type=float, default=DEFAULT_WAIT, metavar="SECONDS",
                   help=f"how long to wait for the outcome (default {DEFAULT_WAIT:g})")
    p.add_argument("--json", action="store_true")


def register_bmc(machine_subparsers: Any) -> None:
    """``appliance machine bmc MACHINE ...`` (added to the ``machine`` command)."""
    p = machine_subparsers.add_parser(
        "bmc", help="set, show or clear a machine's BMC (power and boot control)",
        description="Set the machine's BMC. The password is read from stdin "
                    "(--password-stdin), a file (--password-file) or a prompt; it is "
                    "stored encrypted and never shown.")
    p.add_argument("machine", metavar="MACHINE", help="MAC or hostname")
    p.add_argument("--driver", choices=sorted(control.DEFAULT_PORTS), default="ipmi")
    p.add_argument("--address", help="BMC IP address or host name (redfish: may be a URL)")
    p.add_argument("--port", type=int, help="default 623 (ipmi) or 443 (redfish)")
    p.add_argument("--username")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of stdin")
    p.add_argument("--password-file", metavar="FILE", help="read the password from FILE")
    p.add_argument("--no-verify-tls", action="store_true",
                   help="redfish over https: accept a self-signed BMC certificate")
    p.add_argument("--system-id", default="", help="redfish: the system's id or path "
                   "when the BMC manages several")
    p.add_argument("--show", action="store_true", help="show the settings (no password)")
    p.add_argument("--clear", action="store_true", help="remove the BMC settings")
    p.add_argument("--json", action="store_true")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "power", help="power a machine through its BMC",
        description="Ask the machine's BMC for its power state or change it. `cycle` on a "
                    "machine that is off turns it on.")
    p.set_defaults(func=run_power)
    p.add_argument("machine", metavar="MACHINE", help="MAC or hostname")
    p.add_argument("action", choices=["status", *POWER_ACTIONS])
    _add_wait_options(p)

    p = subparsers.add_parser(
        "boot", help="set a machine's next boot device through its BMC",
        description="Set the next boot device (for the next boot only, unless "
                    "--persistent). `show` prints what the BMC reports.")
    p.set_defaults(func=run_boot)
    p.add_argument("machine", metavar="MACHINE", help="MAC or hostname")
    p.add_argument("device", choices=[*BOOT_DEVICES, "show"])
    p.add_argument("--persistent", action="store_true", help="for every boot, not only the "
                   "next one")
    p.add_argument("--mode", choices=BOOT_MODES, help="firmware flavour (default: uefi if the "
                   "machine last network-booted as UEFI, else bios)")
    _add_wait_options(p)

    p = subparsers.add_parser("identify", help="turn a machine's identify light on or off")
    p.set_defaults(func=run_identify)
    p.add_argument("machine", metavar="MACHINE", help="MAC or hostname")
    p.add_argument("state", choices=["on", "off"])
    _add_wait_options(p)


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin and args.password_file:
        raise control.PowerError("give --password-stdin or --password-file, not both")
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if args.password_file:
        with open(args.password_file, encoding="utf-8") as f:
            return f.readline().rstrip("\r\n")
    if sys.stdin.isatty():
        return getpass.getpass("BMC password: ")
    raise control.PowerError("password: give --password-stdin, --password-file or run on a "
                             "terminal to be asked")


def run_bmc(args: argparse.Namespace, config: Config) -> int:
    setting = bool(args.address) and not (args.clear or args.show)
    if setting and not args.username:
        raise control.PowerError("username: required to set a BMC")
    # read the password before any database transaction is open (a prompt may wait)
    password = _read_password(args) if setting else ""
    db = Database(config.effective_database_url)
    with db.session() as session:
        machine = profiles.find_machine(session, args.machine)
        label = control.machine_label(machine)
        if args.clear:
            control.clear_bmc(session, machine, cli_actor())
            print(f"machine {label}: BMC settings removed")
            return 0
        if args.show or not args.address:
            if not args.show:
                raise control.PowerError("address: required to set a BMC (or use --show, "
                                         "--clear)")
            summary = control.bmc_summary(machine)
            print(json.dumps(summary, indent=2) if args.json else
                  (f"{label}: no BMC" if summary is None else
                   "\n".join(f"{k + ':':12} {v}" for k, v in summary.items())))
            return 0
        settings = control.BmcSettings(
            driver=args.driver, address=args.address, username=args.username,
            password=password, port=args.port,
            verify_tls=not args.no_verify_tls, system_id=args.system_id)
        control.set_bmc(config, session, machine, settings, cli_actor())
        print(f"machine {label}: BMC {args.driver} {settings.username}@{args.address} set")
    return 0


def _queue_and_wait(args: argparse.Namespace, config: Config, operation: str,
                    op_args: dict[str, Any]) -> int:
    db = Database(config.effective_database_url)
    with db.session() as session:
        machine = profiles.find_machine(session, args.machine)
        label = control.machine_label(machine)
        req = control.request(session, machine, operation, op_args, cli_actor())
        request_id = req.id
    if args.no_wait:
        print(json.dumps({"request": request_id, "state": "queued"}) if args.json else
              f"request {request_id} queued")
        return 0
    done = control.wait(db, request_id, timeout=args.wait)
    if args.json:
        print(json.dumps(as_dict(done), indent=2, default=str))
    elif done.state == "succeeded":
        print(_success_line(label, operation, done.result or {}))
    else:
        print(f"appliance: {label}: {operation} failed after {done.attempts} attempt(s): "
              f"{done.error_kind}: {done.error}", file=sys.stderr)
    return 0 if done.state == "succeeded" else 1


def _success_line(label: str, operation: str, result: dict[str, Any]) -> str:
    if operation == "status":
        return f"{label}: power is {result.get('power')}"
    if operation == "get-boot":
        how = control.persistence(bool(result.get("persistent")))
        mode = result.get("mode") or "mode not reported"
        return f"{label}: boot {result.get('device')} ({how}, {mode})"
    if operation == "boot":
        how = control.persistence(bool(result.get("persistent")))
        return f"{label}: next boot {result.get('device')} ({how}, {result.get('mode')})"
    if operation == "identify":
        return f"{label}: identify light {'on' if result.get('on') else 'off'}"
    return f"{label}: power {result.get('action')} done"


def run_power(args: argparse.Namespace, config: Config) -> int:
    if args.action == "status":
        return _queue_and_wait(args, config, "status", {})
    return _queue_and_wait(args, config, "power", {"action": args.action})


def run_boot(args: argparse.Namespace, config: Config) -> int:
    if args.device == "show":
        return _queue_and_wait(args, config, "get-boot", {})
    return _queue_and_wait(args, config, "boot", {"device": args.device,
                                                  "persistent": args.persistent,
                                                  "mode": args.mode})


def run_identify(args: argparse.Namespace, config: Config) -> int:
    return _queue_and_wait(args, config, "identify", {"on": args.state == "on"})
