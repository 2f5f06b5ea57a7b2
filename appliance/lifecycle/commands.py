"""CLI: ``appliance reimage``, ``appliance accept``, ``appliance decommission``.

They call :mod:`appliance.lifecycle.operations` (as the API does) in one transaction;
the daemon's parts do the rest. ``reimage --wait`` follows the machine until it is
``ready`` or ``failed`` and prints each step as it happens. Exit codes: 0 done (or, with
``--wait``, ready), 1 failed, 2 refused, 3 still not finished when the wait ran out.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from sqlalchemy import select

from appliance import profiles
from appliance.config import Config
from appliance.db import Database
from appliance.lifecycle import operations
from appliance.lifecycle.states import FAILED, READY
from appliance.models import Event, Machine
from appliance.power.commands import cli_actor

EXIT_FAILED = 1
EXIT_STILL_RUNNING = 3


def register(subparsers: Any, param_options: Any) -> None:
    p = subparsers.add_parser(
        "reimage", help="install a machine again, from any state, through to ready",
        description="Start a new deployment: check that the bootenv renders for the "
                    "machine, give it new one-time tokens and a new instance-id, set its "
                    "next boot to the network and power-cycle it through its BMC (without "
                    "a BMC: power it on by hand). It is ready once the installed OS phoned "
                    "home and the appliance confirmed the SSH contract.")
    p.set_defaults(func=run_reimage)
    p.add_argument("machine", metavar="MACHINE", help="MAC or hostname")
    p.add_argument("bootenv", help="an installing bootenv, e.g. image-deploy or debian-12")
    p.add_argument("--profile", action="append", metavar="NAME",
                   help="profiles in order, later wins (repeat; replaces the list)")
    p.add_argument("--reason", default="", help="why, for the event log")
    param_options(p)
    p.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                   help="follow the machine until ready or failed, at most SECONDS")
    p.add_argument("--json", action="store_true")

    p = subparsers.add_parser("accept", help="accept a discovered machine (-> available)")
    p.set_defaults(func=run_accept)
    p.add_argument("machine", metavar="MACHINE", help="MAC or hostname")

    p = subparsers.add_parser(
        "decommission", help="end a machine's deployment (-> available)",
        description="Its install, seed and metadata URLs stop answering, its next network "
                    "boot is discovery, and with a BMC it is powered off. Its disk is not "
                    "wiped.")
    p.set_defaults(func=run_decommission)
    p.add_argument("machine", metavar="MACHINE", help="MAC or hostname")
    p.add_argument("--reason", default="")
    p.add_argument("--keep-power", action="store_true", help="do not power it off")


def run_reimage(args: argparse.Namespace, config: Config) -> int:
    from appliance.catalog import load_catalog

    catalog = load_catalog(config)
    db = Database(config.effective_database_url)
    with db.session() as session:
        machine = profiles.find_machine(session, args.machine)
        values = profiles.parse_assignments(catalog, args.param or [], args.param_file or [])
        if args.unset:
            raise profiles.ProfileError("reimage takes --param, not --unset (use "
                                        "`appliance machine set --unset`)")
        deployment = operations.reimage(config, session, catalog, machine, args.bootenv,
                                        actor=cli_actor(), values=values,
                                        profiles=args.profile, reason=args.reason)
        machine_id, name = machine.id, operations.label(machine)
        last_event = session.scalar(select(Event.id).where(Event.machine_id == machine_id)
                                    .order_by(Event.id.desc()).limit(1)) or 0
    if args.json and not args.wait:
        print(json.dumps(deployment, indent=2))
    elif deployment.get("unchanged"):
        print(f"{name}: already being reimaged with {args.bootenv} (deployment "
              f"{deployment['number']}); nothing new started")
    else:
        how = "through its BMC" if deployment["power"] == "bmc" else \
            "power it on by hand (no BMC)"
        print(f"{name}: deployment {deployment['number']} of {args.bootenv} started, "
              f"instance {deployment['instance_id']}; {how}")
    if not args.wait:
        return 0
    return follow(db, machine_id, last_event, args.wait, args.json)


def follow(db: Database, machine_id: int, after_event: int, seconds: float,
           as_json: bool) -> int:
    """Print the machine's state events until it is ready or failed."""
    deadline = time.monotonic() + seconds
    while True:
        with db.session() as session:
            events = list(session.scalars(select(Event).where(
                Event.machine_id == machine_id, Event.id > after_event,
                Event.kind == "state").order_by(Event.id)))
            machine = session.get(Machine, machine_id)
            state = machine.state if machine else FAILED
            for event in events:
                after_event = event.id
                if as_json:
                    print(json.dumps({"at": event.at.isoformat(), "message": event.message,
                                      **(event.details or {})}), flush=True)
                else:
                    print(f"{event.at:%H:%M:%S} {event.message}", flush=True)
        if state == READY:
            return 0
        if state == FAILED:
            return EXIT_FAILED
        if time.monotonic() >= deadline:
            print(f"still {state} after {seconds:g} s", flush=True)
            return EXIT_STILL_RUNNING
        time.sleep(1.0)


def run_accept(args: argparse.Namespace, config: Config) -> int:
    db = Database(config.effective_database_url)
    with db.session() as session:
        machine = profiles.find_machine(session, args.machine)
        operations.accept(config, session, machine, cli_actor())
        print(f"{operations.label(machine)}: available")
    return 0


def run_decommission(args: argparse.Namespace, config: Config) -> int:
    db = Database(config.effective_database_url)
    with db.session() as session:
        machine = profiles.find_machine(session, args.machine)
        operations.decommission(config, session, machine, actor=cli_actor(),
                                reason=args.reason, power_off=not args.keep_power)
        print(f"{operations.label(machine)}: available (deployment ended"
              + ("" if args.keep_power or not machine.bmc_driver else "; powering off")
              + ")")
    return 0
