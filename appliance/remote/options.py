"""The CLI's global options for remote use: ``--endpoint``, ``--token``,
``--token-file``, ``--ca-file``, ``--json`` (and ``APPLIANCE_ENDPOINT``,
``APPLIANCE_TOKEN``). With an endpoint the verb runs over the API; there is no default
endpoint and no fallback."""

from __future__ import annotations

import argparse
import os
import sys

from appliance.remote.client import Client, RemoteError, api_base


def register(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("remote use (over the JSON API)")
    g.add_argument("--endpoint", metavar="URL", help="run the verb against the appliance "
                   "at URL, e.g. https://box:8080 (default: $APPLIANCE_ENDPOINT; none: "
                   "run locally)")
    g.add_argument("--token", help="API token (default: $APPLIANCE_TOKEN); see "
                   "`appliance token create`")
    g.add_argument("--token-file", metavar="FILE", help="read the API token from FILE")
    g.add_argument("--ca-file", metavar="FILE", help="CA certificate(s) to verify the "
                   "endpoint's TLS certificate with (default: the system's)")
    g.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="per request (default 30)")
    g.add_argument("--json", dest="global_json", action="store_true",
                   help="print JSON instead of tables")


def run_remote(args: argparse.Namespace) -> int | None:
    """Run the verb over the API if an endpoint is given (its exit code), else None."""
    from appliance.remote.verbs import run

    endpoint = args.endpoint or os.environ.get("APPLIANCE_ENDPOINT", "")
    if not endpoint:
        if args.token or args.token_file:  # meant for a remote box: never run it here
            print("appliance: --token/--token-file need --endpoint (or APPLIANCE_ENDPOINT); "
                  "nothing was run", file=sys.stderr)
            return 2
        return None
    try:
        api_base(endpoint)
        token = _token(args, endpoint)
    except RemoteError as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 2
    return run(args, Client(endpoint=endpoint, token=token, ca_file=args.ca_file,
                            timeout=args.timeout))


def _token(args: argparse.Namespace, endpoint: str) -> str:
    if args.token and args.token_file:
        raise RemoteError("give --token or --token-file, not both")
    token = args.token or os.environ.get("APPLIANCE_TOKEN", "")
    if args.token_file:
        try:
            with open(os.path.expanduser(args.token_file), encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            raise RemoteError(f"--token-file {args.token_file}: {exc.strerror or exc}") \
                from None
    if not token:
        raise RemoteError(f"no API token for {endpoint}: give --token, --token-file or "
                          "APPLIANCE_TOKEN (make one on the appliance: appliance token "
                          "create USER)")
    return token
