"""The ``appliance`` command: run the daemon and manage subnets, reservations and machines."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from appliance import __version__, inventory, profiles, tables
from appliance.config import Config, ConfigError, load_config
from appliance.db import Database, current_revision, read_counters
from appliance.render import RenderError
from appliance.tables import table as _table

if TYPE_CHECKING:
    from appliance.catalog import Catalog


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _print(args: argparse.Namespace, rows: list[dict[str, Any]], columns: list[str]) -> None:
    if getattr(args, "json", False):
        print(tables.dumps(rows))
    else:
        print(_table(rows, columns))


# ---- commands -------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    from appliance.daemon import serve

    return serve(config, args.config, args.only)


def cmd_run_part(args: argparse.Namespace, config: Config) -> int:
    from appliance.daemon import run_part

    return run_part(args.part, config)


def cmd_db(args: argparse.Namespace, config: Config) -> int:
    db = Database(config.effective_database_url)
    if args.action == "upgrade":
        db.migrate()
    print(f"schema revision: {current_revision(db.engine) or '(empty database)'}")
    return 0


def cmd_subnet(args: argparse.Namespace, config: Config) -> int:
    db = Database(config.effective_database_url)
    with db.session() as session:
        if args.action == "add":
            dns = [d for d in (args.dns or "").split(",") if d.strip()]
            subnet = inventory.add_subnet(
                session, args.network, pool=args.pool, router=args.router, dns=dns,
                domain=args.domain, lease_seconds=args.lease_time,
                next_server=args.next_server)
            print(f"subnet {subnet.network} added")
        elif args.action == "delete":
            inventory.delete_subnet(session, args.network)
            print(f"subnet {args.network} deleted")
        else:
            rows = [inventory.as_dict(s) for s in inventory.list_subnets(session)]
            _print(args, rows, tables.SUBNETS)
    return 0


def cmd_reservation(args: argparse.Namespace, config: Config) -> int:
    db = Database(config.effective_database_url)
    with db.session() as session:
        if args.action == "add":
            r = inventory.add_reservation(session, args.mac, args.ip, args.hostname)
            print(f"{r.mac} reserved {r.ip}")
        elif args.action == "delete":
            inventory.delete_reservation(session, args.mac)
            print(f"reservation of {args.mac} deleted")
        else:
            rows = [inventory.as_dict(r) for r in inventory.list_reservations(session)]
            _print(args, rows, tables.RESERVATIONS)
    return 0


def cmd_machines(args: argparse.Namespace, config: Config) -> int:
    from appliance.listing import all_machines

    db = Database(config.effective_database_url)
    with db.session() as session:
        rows = all_machines(session, state=args.state, q=args.search)
    _print(args, rows, tables.MACHINES)
    return 0


def cmd_leases(args: argparse.Namespace, config: Config) -> int:
    db = Database(config.effective_database_url)
    with db.session() as session:
        rows = [inventory.as_dict(x) for x in inventory.list_leases(session, args.all)]
    _print(args, rows, tables.LEASES)
    return 0


def cmd_events(args: argparse.Namespace, config: Config) -> int:
    db = Database(config.effective_database_url)
    with db.session() as session:
        rows = []
        for e in inventory.list_events(session, args.machine, args.limit):
            row = inventory.as_dict(e)
            row["mac"] = e.machine.mac if e.machine else None
            rows.append(row)
    _print(args, rows, tables.EVENTS)
    return 0


def cmd_counters(args: argparse.Namespace, config: Config) -> int:
    from appliance.web.request_counts import workers_summed

    counters = workers_summed(read_counters(Database(config.effective_database_url)))
    if args.json:
        print(json.dumps(counters, indent=2))
    else:
        rows = [{"part": p, "name": n, "value": v}
                for p, values in counters.items() for n, v in values.items()]
        print(_table(rows, ["part", "name", "value"]))
    return 0


def _catalog(config: Config) -> Catalog:
    from appliance.catalog import load_catalog

    catalog = load_catalog(config)
    for error in catalog.errors:
        print(f"appliance: refused: {error}", file=sys.stderr)
    return catalog


def _target(config: Config, session: Any, machine: Any, url: str | None) -> Any:
    from appliance.machinefiles import BootTarget, appliance_url_for

    base = url or appliance_url_for(config, session, machine)
    if not base:
        raise ValueError("cannot tell which address this machine reaches the appliance on "
                         "(no http.public_address, no next-server on its subnet): "
                         "give --appliance-url http://ADDRESS:PORT")
    return BootTarget.for_url(base)


def cmd_render(args: argparse.Namespace, config: Config) -> int:
    from appliance.machinefiles import render_machine_file

    catalog = _catalog(config)
    db = Database(config.effective_database_url)
    with db.session() as session:
        machine = profiles.find_machine(session, args.machine)
        target = _target(config, session, machine, args.appliance_url)
        sys.stdout.write(render_machine_file(config, session, catalog, machine, args.file,
                                             target))
        session.rollback()  # rendering changes nothing
    return 0


def cmd_machine(args: argparse.Namespace, config: Config) -> int:
    from appliance.machinefiles import machine_params

    if args.action == "bmc":
        from appliance.power.commands import run_bmc

        return run_bmc(args, config)
    catalog = _catalog(config)
    db = Database(config.effective_database_url)
    with db.session() as session:
        if args.action == "add":
            machine = inventory.add_machine(session, args.machine, args.hostname)
            print(f"machine {machine.mac} added")
            return 0
        machine = profiles.find_machine(session, args.machine)
        if args.action == "timeline":
            from appliance.timeline import timeline_for

            data = timeline_for(session, machine).as_dict()
            print(tables.dumps(data) if args.json else tables.timeline(data))
            return 0
        if args.action == "set":
            values = profiles.parse_assignments(catalog, args.param or [], args.param_file or [])
            profiles.configure_machine(
                session, catalog, machine, bootenv=args.bootenv, profiles=args.profile,
                values=values, unset=args.unset or [], hostname=args.hostname)
            print(f"machine {machine.mac} updated")
            return 0
        from appliance.power.control import bmc_summary

        row = inventory.as_dict(machine)
        row["install_in_progress"] = bool(machine.install_token)
        row["bmc"] = bmc_summary(machine)
        bootenv = catalog.bootenvs.get(machine.bootenv)
        try:
            row["effective_params"] = machine_params(session, bootenv, machine) \
                if bootenv else None
        except ValueError as exc:
            row["effective_params"] = None
            row["params_error"] = str(exc)
    print(tables.dumps(row) if args.json else tables.record(row))
    return 0


def cmd_profile(args: argparse.Namespace, config: Config) -> int:
    catalog = _catalog(config)
    db = Database(config.effective_database_url)
    with db.session() as session:
        if args.action == "set":
            values = profiles.parse_assignments(catalog, args.param or [], args.param_file or [])
            profiles.set_profile(session, catalog, args.name, values, args.unset or [],
                                 args.description)
            print(f"profile {args.name} updated")
        elif args.action == "delete":
            profiles.delete_profile(session, args.name)
            print(f"profile {args.name} deleted")
        elif args.action == "show":
            row = inventory.as_dict(profiles.get_profile(session, args.name))
            print(json.dumps(row, indent=2, default=str))
        else:
            from appliance.listing import profile_rows

            rows = profile_rows(session)
            print(tables.dumps(rows) if args.json else tables.profile_table(rows))
    return 0


def cmd_logs(args: argparse.Namespace, config: Config) -> int:
    """Installer log lines a machine sent (remote syslog or uploads)."""
    import time

    from appliance.installlogs import read_install_logs

    db = Database(config.effective_database_url)
    since = args.since
    while True:
        with db.session() as session:
            machine = profiles.find_machine(session, args.machine)
            rows = read_install_logs(session, machine.id, since, args.limit)
            out = [{"id": r.id, "at": r.at.isoformat(), "source": r.source,
                    "client": r.client, "severity": r.severity, "program": r.program,
                    "message": r.message} for r in rows]
        if args.json:
            print(json.dumps(out, indent=2))
        else:
            for r in out:
                print(f"{r['at'][:19]} {r['program'] or '-'}: {r['message']}")
        if out:
            since = out[-1]["id"]
        if not args.follow:
            return 0
        sys.stdout.flush()
        try:
            time.sleep(1)
        except KeyboardInterrupt:  # Ctrl-C ends --follow
            return 0


def cmd_bootenvs(args: argparse.Namespace, config: Config) -> int:
    from appliance.listing import bootenv_rows

    catalog = _catalog(config)
    rows = bootenv_rows(catalog, config.images_dir)
    if args.json:
        print(json.dumps({"bootenvs": rows, "refused": catalog.errors}, indent=2))
    else:
        print(_table(rows, tables.BOOTENVS))
    return 1 if catalog.errors else 0


# ---- parser ---------------------------------------------------------------------------

def _param_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="set a param (typed as the bootenvs declare it; lists and "
                   "mappings as JSON); repeatable")
    p.add_argument("--param-file", action="append", metavar="KEY=PATH",
                   help="set a param from a file (a list param takes its lines, e.g. an "
                   "authorized_keys file)")
    p.add_argument("--unset", action="append", metavar="KEY", help="remove a param")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="appliance", description="Bare-metal provisioning appliance.")
    parser.add_argument("--config", help="configuration file (default: $APPLIANCE_CONFIG or "
                        "/etc/appliance/appliance.toml)")
    parser.add_argument("--version", action="version", version=f"appliance {__version__}")
    from appliance.remote import options as remote_options

    remote_options.register(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable[..., int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    p = command("serve", cmd_serve, "run the daemon: DHCP, TFTP, HTTP, syslog, power and "
                "lifecycle")
    p.add_argument("--only", action="append", metavar="PART",
                   help="run only this part (dhcp, tftp, http, syslog, power, lifecycle); "
                   "repeatable")
    p = sub.add_parser("run-part")  # internal: one part, started by `serve`
    p.set_defaults(func=cmd_run_part)
    p.add_argument("part")

    p = command("db", cmd_db, "database schema")
    p.add_argument("action", choices=["upgrade", "current"])

    p = command("subnet", cmd_subnet, "DHCP subnets")
    ssub = p.add_subparsers(dest="action", required=True)
    a = ssub.add_parser("add", help="add a subnet")
    a.add_argument("network", help="e.g. 10.0.0.0/24")
    a.add_argument("--pool", help="dynamic range FIRST-LAST (omit: reservations only)")
    a.add_argument("--router", help="default gateway (option 3)")
    a.add_argument("--dns", help="DNS servers, comma separated (option 6)")
    a.add_argument("--domain", default="", help="domain name (option 15)")
    a.add_argument("--lease-time", type=int, default=3600, help="seconds (default 3600)")
    a.add_argument("--next-server", help="appliance address machines on this subnet use")
    d = ssub.add_parser("delete", help="delete a subnet")
    d.add_argument("network")
    ls = ssub.add_parser("list", help="list subnets")
    ls.add_argument("--json", action="store_true")

    p = command("reservation", cmd_reservation, "fixed addresses for MACs")
    rsub = p.add_subparsers(dest="action", required=True)
    a = rsub.add_parser("add", help="reserve an address for a MAC")
    a.add_argument("mac")
    a.add_argument("ip")
    a.add_argument("--hostname")
    d = rsub.add_parser("delete", help="delete a reservation")
    d.add_argument("mac")
    ls = rsub.add_parser("list", help="list reservations")
    ls.add_argument("--json", action="store_true")

    p = command("machines", cmd_machines, "list machines")
    p.add_argument("--state", default="", help="only machines in this state")
    p.add_argument("--search", default="", metavar="TEXT",
                   help="MAC, hostname or bootenv contains TEXT")
    p.add_argument("--json", action="store_true")
    p = command("leases", cmd_leases, "list active DHCP leases")
    p.add_argument("--all", action="store_true", help="include released/expired/declined")
    p.add_argument("--json", action="store_true")
    p = command("events", cmd_events, "list recent events")
    p.add_argument("--machine", metavar="MAC")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true")
    p = command("machine", cmd_machine, "show or change one machine (by MAC or hostname)")
    msub = p.add_subparsers(dest="action", required=True)
    madd = msub.add_parser("add", help="enroll a machine by MAC before it is seen")
    madd.add_argument("machine", metavar="MAC")
    madd.add_argument("--hostname")
    show = msub.add_parser("show", help="a machine's settings and effective params")
    show.add_argument("machine", metavar="MACHINE")
    show.add_argument("--json", action="store_true")
    tl = msub.add_parser("timeline", help="the last provisioning run, phase by phase")
    tl.add_argument("machine", metavar="MACHINE")
    tl.add_argument("--json", action="store_true")
    mset = msub.add_parser("set", help="set bootenv, profiles, params, hostname")
    mset.add_argument("machine", metavar="MACHINE")
    mset.add_argument("--bootenv", help="boot environment of its next boot (an installer "
                      "starts a new install)")
    mset.add_argument("--profile", action="append", metavar="NAME",
                      help="profiles in order, later wins (repeat; replaces the list)")
    mset.add_argument("--hostname")
    _param_options(mset)
    from appliance.power import commands as power_commands

    power_commands.register_bmc(msub)
    power_commands.register(sub)
    from appliance.lifecycle import commands as lifecycle_commands

    lifecycle_commands.register(sub, _param_options)
    from appliance.auth import commands as auth_commands

    auth_commands.register(sub)

    p = command("profile", cmd_profile, "named sets of params; 'global' applies to all")
    psub = p.add_subparsers(dest="action", required=True)
    pset = psub.add_parser("set", help="create a profile or change its params")
    pset.add_argument("name")
    pset.add_argument("--description")
    _param_options(pset)
    for action in ("show", "delete"):
        psub.add_parser(action, help=f"{action} a profile").add_argument("name")
    ls = psub.add_parser("list", help="list profiles")
    ls.add_argument("--json", action="store_true")

    from appliance.images import commands as images_commands

    images_commands.register(sub)
    p = command("logs", cmd_logs, "installer log lines a machine sent")
    p.add_argument("machine", metavar="MACHINE", help="MAC or hostname")
    p.add_argument("--since", type=int, default=0, metavar="ID", help="lines after this id")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    p.add_argument("--json", action="store_true")

    p = command("bootenvs", cmd_bootenvs, "boot environments, their images, refused files")
    p.add_argument("--json", action="store_true")
    p = command("render", cmd_render, "print a file exactly as a machine would receive it")
    p.add_argument("machine", metavar="MACHINE", help="MAC or hostname")
    p.add_argument("file", metavar="FILE", help="boot.ipxe, grub.cfg, kernel-params or one "
                   "of its bootenv's files (e.g. preseed.cfg)")
    p.add_argument("--appliance-url", metavar="URL", help="the appliance's URL as the "
                   "machine sees it (default: http.public_address or its subnet's "
                   "next-server)")

    p = command("counters", cmd_counters, "packet and transfer counters of the servers")
    p.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from appliance.remote import options as remote_options

    args = build_parser().parse_args(argv)
    args.json = bool(getattr(args, "json", False) or args.global_json)
    remote = remote_options.run_remote(args)  # over the API: no local config or database
    if remote is not None:
        return remote
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"appliance: configuration error: {exc}", file=sys.stderr)
        return 2
    _setup_logging(config.log_level)
    try:
        return args.func(args, config)
    except (inventory.InventoryError, ValueError, RenderError) as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
