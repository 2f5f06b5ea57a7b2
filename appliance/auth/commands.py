"""CLI: ``appliance user add|list|passwd|disable|enable`` and ``appliance token
create|list|revoke``, run as root on the appliance (straight on the database).

There is no default user and no default password: the first admin is made with
``appliance user add NAME``, which asks for the password twice on the terminal (or reads
one line from stdin with ``--password-stdin``). A token is printed once, when created.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from typing import Any

from appliance.auth import tokens, users
from appliance.config import Config
from appliance.db import Database
from appliance.power.commands import cli_actor


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("user", help="users of the web UI and the API")
    sub = p.add_subparsers(dest="user_command", required=True)
    add = sub.add_parser("add", help="add a user (asks for the password)")
    add.add_argument("name")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of stdin")
    add.set_defaults(func=run_user_add)
    pw = sub.add_parser("passwd", help="set a user's password (ends their login sessions)")
    pw.add_argument("name")
    pw.add_argument("--password-stdin", action="store_true")
    pw.set_defaults(func=run_user_passwd)
    for action, text in (("disable", "no login, no API token works, sessions end"),
                         ("enable", "allow a disabled user again")):
        d = sub.add_parser(action, help=f"{action} a user: {text}")
        d.add_argument("name")
        d.set_defaults(func=run_user_disable, disable=action == "disable")
    ls = sub.add_parser("list", help="list users")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=run_user_list)

    p = subparsers.add_parser("token", help="API tokens for scripts and the remote CLI")
    sub = p.add_subparsers(dest="token_command", required=True)
    create = sub.add_parser("create", help="create a token for a user (printed once)")
    create.add_argument("user")
    create.add_argument("--label", default="", help="what it is for")
    create.add_argument("--expires-days", type=int, metavar="DAYS")
    create.add_argument("--json", action="store_true")
    create.set_defaults(func=run_token_create)
    ls = sub.add_parser("list", help="list tokens (never the tokens themselves)")
    ls.add_argument("--user")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=run_token_list)
    rv = sub.add_parser("revoke", help="revoke a token by its id")
    rv.add_argument("id", type=int)
    rv.set_defaults(func=run_token_revoke)


def read_new_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    if not sys.stdin.isatty():
        raise users.AuthError("no terminal to ask for the password: use --password-stdin")
    first = getpass.getpass("New password: ")
    if getpass.getpass("Again: ") != first:
        raise users.AuthError("the two passwords differ; nothing changed")
    return first


def run_user_add(args: argparse.Namespace, config: Config) -> int:
    users.check_name(args.name)
    db = Database(config.effective_database_url)
    with db.session() as session:  # say so before asking for a password
        if any(u.name == args.name for u in users.list_users(session)):
            raise users.AuthError(f"user {args.name!r} exists; change its password with "
                                  f"`appliance user passwd {args.name}`")
    password = read_new_password(args.password_stdin)
    with db.session() as session:
        users.add_user(session, args.name, password, actor=cli_actor())
    print(f"user {args.name} added")
    return 0


def run_user_passwd(args: argparse.Namespace, config: Config) -> int:
    password = read_new_password(args.password_stdin)
    with Database(config.effective_database_url).session() as session:
        user = users.get_user(session, args.name)
        users.set_password(session, user, password, actor=cli_actor())
    print(f"password of {args.name} changed; their login sessions ended")
    return 0


def run_user_disable(args: argparse.Namespace, config: Config) -> int:
    with Database(config.effective_database_url).session() as session:
        user = users.get_user(session, args.name)
        users.set_disabled(session, user, args.disable, actor=cli_actor())
    print(f"user {args.name} {'disabled' if args.disable else 'enabled'}")
    return 0


def user_row(user: Any) -> dict[str, Any]:
    return {"name": user.name, "state": "disabled" if user.disabled_at else "enabled",
            "created_at": user.created_at.isoformat(timespec="seconds"),
            "last_login_at": user.last_login_at.isoformat(timespec="seconds")
            if user.last_login_at else None}


def run_user_list(args: argparse.Namespace, config: Config) -> int:
    from appliance.cli import _print

    with Database(config.effective_database_url).session() as session:
        rows = [user_row(u) for u in users.list_users(session)]
    _print(args, rows, ["name", "state", "created_at", "last_login_at"])
    return 0


def token_row(row: Any) -> dict[str, Any]:
    def when(value: Any) -> str | None:
        return value.isoformat(timespec="seconds") if value else None

    return {"id": row.id, "user": row.user.name, "label": row.label, "prefix": row.prefix,
            "state": tokens.token_state(row), "created_at": when(row.created_at),
            "expires_at": when(row.expires_at), "last_used_at": when(row.last_used_at)}


def run_token_create(args: argparse.Namespace, config: Config) -> int:
    with Database(config.effective_database_url).session() as session:
        user = users.get_user(session, args.user)
        row, token = tokens.create_token(session, user, actor=cli_actor(), label=args.label,
                                         expires_days=args.expires_days)
        out = token_row(row)
    if args.json:
        print(json.dumps({**out, "token": token}, indent=2))
    else:
        print(token)
        print(f"(token {out['id']} for {args.user}; shown once, keep it safe)",
              file=sys.stderr)
    return 0


def run_token_list(args: argparse.Namespace, config: Config) -> int:
    from appliance.cli import _print

    with Database(config.effective_database_url).session() as session:
        user = users.get_user(session, args.user) if args.user else None
        rows = [token_row(r) for r in tokens.list_tokens(session, user)]
    _print(args, rows, ["id", "user", "label", "prefix", "state", "created_at",
                        "expires_at", "last_used_at"])
    return 0


def run_token_revoke(args: argparse.Namespace, config: Config) -> int:
    with Database(config.effective_database_url).session() as session:
        row = tokens.revoke_token(session, args.id, actor=cli_actor())
        name = row.user.name
    print(f"token {args.id} of {name} revoked")
    return 0
