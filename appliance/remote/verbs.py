"""The CLI's verbs over the JSON API: each verb is a request (or a few) and a printer,
the same printers as the local CLI (:mod:`appliance.tables`). ``--json`` prints the
API's answer as it came (for lists: its ``items``, the rows local ``--json`` prints).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from appliance import tables
from appliance.remote.client import Client, RemoteError

#: Verbs that only make sense on the appliance itself.
LOCAL_ONLY = frozenset({"serve", "run-part", "db", "user", "token", "logs", "render",
                        "counters", "images"})
MAX_PAGE = 500
DONE = ("succeeded", "failed", "cancelled")

Verb = Callable[[Client, argparse.Namespace], int]


def _q(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def _rows(args: argparse.Namespace, rows: list[dict[str, Any]], columns: list[str]) -> int:
    print(tables.dumps(rows) if args.json else tables.table(rows, columns))
    return 0


def _say(args: argparse.Namespace, answer: Any, line: str) -> int:
    print(tables.dumps(answer) if args.json else line)
    return 0


def _label(view: dict[str, Any]) -> str:
    return view.get("hostname") or view.get("machine") or view.get("mac") or "?"


def _values(args: argparse.Namespace) -> dict[str, Any]:
    """``--param KEY=VALUE``: the value as JSON if it parses, else as text (the server
    checks it against the bootenvs' declared types)."""
    if getattr(args, "param_file", None):
        raise RemoteError("--param-file has no remote form (the file is on this side): "
                          "give --param KEY=VALUE with the value as JSON")
    values: dict[str, Any] = {}
    for item in getattr(args, "param", None) or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RemoteError(f"--param {item!r}: expected KEY=VALUE")
        try:
            values[key.strip()] = json.loads(raw)
        except ValueError:
            values[key.strip()] = raw
    return values


def machines(c: Client, args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    while True:
        page = c.call("GET", "/machines", query={"state": args.state, "q": args.search,
                                                 "limit": MAX_PAGE, "offset": len(rows)})
        rows += page["items"]
        if not page["items"] or len(rows) >= page["total"]:
            return _rows(args, rows, tables.MACHINES)


def leases(c: Client, args: argparse.Namespace) -> int:
    answer = c.call("GET", "/leases", query={"all": "1" if args.all else None})
    return _rows(args, answer["items"], tables.LEASES)


def events(c: Client, args: argparse.Namespace) -> int:
    answer = c.call("GET", "/events", query={"machine": args.machine, "limit": args.limit})
    return _rows(args, answer["items"], tables.EVENTS)


def bootenvs(c: Client, args: argparse.Namespace) -> int:
    answer = c.call("GET", "/bootenvs")
    if args.json:
        print(tables.dumps(answer))
    else:
        print(tables.table(answer["items"], tables.BOOTENVS))
        for error in answer.get("refused") or []:
            print(f"appliance: refused: {error}", file=sys.stderr)
    return 1 if answer.get("refused") else 0


def subnet(c: Client, args: argparse.Namespace) -> int:
    if args.action == "add":
        dns = [d.strip() for d in (args.dns or "").split(",") if d.strip()]
        body = {"network": args.network, "pool": args.pool, "router": args.router,
                "dns": dns, "domain": args.domain, "lease_seconds": args.lease_time,
                "next_server": args.next_server}
        answer = c.call("POST", "/subnets", {k: v for k, v in body.items() if v is not None})
        return _say(args, answer, f"subnet {answer['network']} added")
    if args.action == "delete":
        answer = c.call("DELETE", f"/subnets/{_q(args.network)}")
        return _say(args, answer, f"subnet {args.network} deleted")
    return _rows(args, c.call("GET", "/subnets")["items"], tables.SUBNETS)


def reservation(c: Client, args: argparse.Namespace) -> int:
    if args.action == "add":
        body = {"mac": args.mac, "ip": args.ip}
        if args.hostname is not None:
            body["hostname"] = args.hostname
        answer = c.call("POST", "/reservations", body)
        return _say(args, answer, f"{answer['mac']} reserved {answer['ip']}")
    if args.action == "delete":
        answer = c.call("DELETE", f"/reservations/{_q(args.mac)}")
        return _say(args, answer, f"reservation of {args.mac} deleted")
    return _rows(args, c.call("GET", "/reservations")["items"], tables.RESERVATIONS)


def machine(c: Client, args: argparse.Namespace) -> int:
    ident = _q(args.machine)
    if args.action == "add":
        body = {"mac": args.machine}
        if args.hostname is not None:
            body["hostname"] = args.hostname
        answer = c.call("POST", "/machines", body)
        return _say(args, answer, f"machine {answer['mac']} added")
    if args.action == "set":
        body: dict[str, Any] = {"params": _values(args)}
        for key, value in (("bootenv", args.bootenv), ("profiles", args.profile),
                           ("unset", args.unset), ("hostname", args.hostname)):
            if value is not None:
                body[key] = value
        answer = c.call("PATCH", f"/machines/{ident}", body)
        return _say(args, answer, f"machine {answer['mac']} updated")
    if args.action == "bmc":
        return bmc(c, args)
    if args.action == "timeline":
        answer = c.call("GET", f"/machines/{ident}/timeline")
        print(tables.dumps(answer) if args.json else tables.timeline(answer))
        return 0
    answer = c.call("GET", f"/machines/{ident}")
    print(tables.dumps(answer) if args.json else tables.record(answer))
    return 0


def bmc(c: Client, args: argparse.Namespace) -> int:
    from appliance.power.commands import _read_password

    path = f"/machines/{_q(args.machine)}/bmc"
    if args.clear:
        return _say(args, c.call("DELETE", path), f"machine {args.machine}: BMC settings "
                                                  "removed")
    if args.show or not args.address:
        if not args.show:
            raise RemoteError("address: required to set a BMC (or use --show, --clear)")
        summary = c.call("GET", path)["bmc"]
        print(json.dumps(summary, indent=2) if args.json else
              (f"{args.machine}: no BMC" if summary is None else
               "\n".join(f"{k + ':':12} {v}" for k, v in summary.items())))
        return 0
    if not args.username:
        raise RemoteError("username: required to set a BMC")
    body = {"driver": args.driver, "address": args.address, "username": args.username,
            "password": _read_password(args), "verify_tls": not args.no_verify_tls,
            "system_id": args.system_id}
    if args.port is not None:
        body["port"] = args.port
    answer = c.call("PUT", path, body)
    return _say(args, answer, f"machine {args.machine}: BMC {args.driver} "
                              f"{args.username}@{args.address} set")


def profile(c: Client, args: argparse.Namespace) -> int:
    if args.action == "set":
        body: dict[str, Any] = {"params": _values(args), "unset": args.unset or []}
        if args.description is not None:
            body["description"] = args.description
        answer = c.call("PUT", f"/profiles/{_q(args.name)}", body)
        return _say(args, answer, f"profile {args.name} updated")
    if args.action == "delete":
        answer = c.call("DELETE", f"/profiles/{_q(args.name)}")
        return _say(args, answer, f"profile {args.name} deleted")
    rows = c.call("GET", "/profiles")["items"]
    if args.action == "show":
        found = [r for r in rows if r["name"] == args.name]
        if not found:
            raise RemoteError(f"profile {args.name!r} does not exist")
        print(tables.dumps(found[0]))
        return 0
    print(tables.dumps(rows) if args.json else tables.profile_table(rows))
    return 0


def _queue(c: Client, args: argparse.Namespace, what: str, operation: str,
           body: dict[str, Any]) -> int:
    from appliance.power.commands import _success_line

    req = c.call("POST", f"/machines/{_q(args.machine)}/{what}", body)
    if args.no_wait:
        print(json.dumps({"request": req["id"], "state": "queued"}) if args.json else
              f"request {req['id']} queued")
        return 0
    deadline = time.monotonic() + args.wait
    while req["state"] not in DONE and time.monotonic() < deadline:
        time.sleep(0.5)
        req = c.call("GET", f"/power-requests/{req['id']}")
    if args.json:
        print(tables.dumps(req))
    elif req["state"] == "succeeded":
        print(_success_line(args.machine, operation, req.get("result") or {}))
    elif req["state"] in DONE:
        print(f"appliance: {args.machine}: {operation} failed after {req['attempts']} "
              f"attempt(s): {req.get('error_kind')}: {req.get('error')}", file=sys.stderr)
    else:
        print(f"appliance: {args.machine}: request {req['id']} still {req['state']} after "
              f"{args.wait:g} s", file=sys.stderr)
    return 0 if req["state"] == "succeeded" else 1


def power(c: Client, args: argparse.Namespace) -> int:
    return _queue(c, args, "power", "status" if args.action == "status" else "power",
                  {"action": args.action})


def boot(c: Client, args: argparse.Namespace) -> int:
    if args.device == "show":
        raise RemoteError("boot MACHINE show has no remote form yet (the API has no "
                          "get-boot call)")
    body: dict[str, Any] = {"device": args.device, "persistent": args.persistent}
    if args.mode:
        body["mode"] = args.mode
    return _queue(c, args, "boot", "boot", body)


def identify(c: Client, args: argparse.Namespace) -> int:
    return _queue(c, args, "identify", "identify", {"on": args.state == "on"})


def reimage(c: Client, args: argparse.Namespace) -> int:
    if args.wait:
        raise RemoteError("reimage --wait has no remote form yet; follow it with "
                          "`appliance events --machine MACHINE`")
    if args.unset:
        raise RemoteError("reimage takes --param, not --unset (use `appliance machine "
                          "set --unset`)")
    body: dict[str, Any] = {"bootenv": args.bootenv, "params": _values(args),
                            "reason": args.reason}
    if args.profile is not None:
        body["profiles"] = args.profile
    view = c.call("POST", f"/machines/{_q(args.machine)}/reimage", body)
    deployment = view.get("deployment") or {}
    if args.json:
        print(tables.dumps(view))
    elif deployment.get("unchanged"):
        print(f"{_label(view)}: already being reimaged with {args.bootenv} (deployment "
              f"{deployment.get('number')}); nothing new started")
    else:
        how = "through its BMC" if deployment.get("power") == "bmc" else \
            "power it on by hand (no BMC)"
        print(f"{_label(view)}: deployment {deployment.get('number')} of {args.bootenv} "
              f"started, instance {deployment.get('instance_id')}; {how}")
    return 0


def accept(c: Client, args: argparse.Namespace) -> int:
    view = c.call("POST", f"/machines/{_q(args.machine)}/accept", {})
    return _say(args, view, f"{_label(view)}: available")


def decommission(c: Client, args: argparse.Namespace) -> int:
    view = c.call("POST", f"/machines/{_q(args.machine)}/decommission",
                  {"reason": args.reason, "power_off": not args.keep_power})
    return _say(args, view, f"{_label(view)}: available (deployment ended)")


VERBS: dict[str, Verb] = {
    "machines": machines, "leases": leases, "events": events, "bootenvs": bootenvs,
    "subnet": subnet, "reservation": reservation, "machine": machine, "profile": profile,
    "power": power, "boot": boot, "identify": identify, "reimage": reimage,
    "accept": accept, "decommission": decommission,
}


def run(args: argparse.Namespace, client: Client) -> int:
    """Run ``args.command`` against ``client``; one line on stderr if it fails."""
    verb = VERBS.get(args.command)
    if verb is None:
        print(f"appliance: {args.command} runs on the appliance itself; it has no remote "
              "form", file=sys.stderr)
        return 2
    try:
        return verb(client, args)
    except RemoteError as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 1
