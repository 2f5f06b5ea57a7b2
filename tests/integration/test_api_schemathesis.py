"""The JSON API against its own OpenAPI document: schemathesis fuzzes a real ``appliance
serve`` (HTTP part, gunicorn) in a namespace with a token, over every documented
operation, and must find no 5xx, no undocumented status or content type and no answer
outside its schema; schema-violating requests must be refused. Then the credentials:
no token, a wrong token and a revoked token are refused with 401, by the API and by
the remote CLI (``appliance --endpoint ... --token ...``) run against the same server.

``positive_data_acceptance`` is left out on purpose: the API checks more than a schema
can say (a bootenv must exist, param names are identifiers, a machine must be in a state
that allows the step), and those refusals are 400/409 with the reason by design.

The run is reproducible: the seed is fixed (``APPLIANCE_SCHEMATHESIS_SEED`` overrides
it, ``APPLIANCE_SCHEMATHESIS_EXAMPLES`` the examples per operation).
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.db import Database
from appliance.models import Event, PowerRequest
from tests import netns
from tests.conftest import ApplianceProcess

pytestmark = pytest.mark.integration

LOCAL = "http://127.0.0.1:8080"
MACHINE = "52:54:00:5c:00:01"
CHECKS_LEFT_OUT = "positive_data_acceptance"


@dataclass
class Rig:
    ns: netns.Namespace
    app: ApplianceProcess
    work: Path
    db_url: str

    def status(self, path: str, *headers: str, method: str = "GET") -> str:
        args = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", method,
                "--max-time", "20"]
        for header in headers:
            args += ["-H", header]
        return self.ns.exec([*args, f"{LOCAL}{path}"], timeout=30).stdout


@pytest.fixture
def rig(namespace: netns.Namespace, tmp_path: Path) -> Iterator[Rig]:
    state = tmp_path / "state"
    url = f"sqlite:///{state / 'appliance.db'}"
    config = textwrap.dedent(f"""\
        state_dir = "{state}"
        log_level = "INFO"
        [syslog]
        enabled = false
        """)
    namespace.ip("link", "set", "lo", "up")
    app = ApplianceProcess(namespace, tmp_path, config, only=["http"])
    try:
        app.cli("db", "upgrade")
        # Something for the fuzzer to find: a machine, a subnet, a reservation, a profile.
        app.cli("machine", "add", MACHINE, "--hostname", "fuzz1")
        app.cli("subnet", "add", "10.250.90.0/24", "--pool", "10.250.90.100-10.250.90.150")
        app.cli("reservation", "add", "52:54:00:5c:00:02", "10.250.90.20")
        # A BMC nobody answers at (the power part does not run: requests just queue).
        app.cli("machine", "bmc", "fuzz1", "--address", "127.0.0.1", "--port", "6239",
                "--username", "admin", "--password-stdin", input="fuzz-password\n")
        app.cli("profile", "set", "rack1", "--description", "fuzzing target")
        app.start()
        netns.wait_for(lambda: namespace.exec(["curl", "-sf", f"{LOCAL}/healthz"],
                                              check=False).returncode == 0, 60,
                       what="HTTP part up:\n" + app.log()[-3000:])
        yield Rig(namespace, app, tmp_path, url)
    finally:
        app.stop()
        print(app.log()[-3000:])


def _schemathesis(rig: Rig, token: str) -> tuple[int, str]:
    seed = os.environ.get("APPLIANCE_SCHEMATHESIS_SEED", "20261122")
    examples = os.environ.get("APPLIANCE_SCHEMATHESIS_EXAMPLES", "40")
    config = rig.work / "schemathesis.toml"
    # Path parameters that name things that exist, so the fuzzer reaches the code
    # behind the 404s (it still tries its own values too).
    config.write_text(textwrap.dedent("""\
        [parameters]
        "path.ident" = "fuzz1"
        """))
    cmd = [sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()",
           "--config-file", str(config), "--no-color",
           "run", f"{LOCAL}/api/v1/openapi.json",
           "-H", f"Authorization: Bearer {token}",
           "--checks", "all", "--exclude-checks", CHECKS_LEFT_OUT,
           "--max-examples", examples, "--seed", seed, "--workers", "2",
           "--generation-database", "none", "--request-timeout", "20"]
    result = rig.ns.exec(cmd, check=False, timeout=900, cwd=str(rig.work))
    return result.returncode, result.stdout + result.stderr


def test_schemathesis_finds_nothing(rig: Rig) -> None:
    token = rig.app.api_token()
    code, output = _schemathesis(rig, token)
    print(output[-12000:])
    assert code == 0, "schemathesis found failures (output above)"
    # The fuzzer got past authentication and reached the machine's operations: its
    # queued power requests and recorded writes carry the token's user.
    db = Database(rig.db_url)
    try:
        with db.session() as session:
            actors = {a for (a,) in session.query(PowerRequest.actor).distinct()}
            kinds = {k for (k,) in session.query(Event.kind)
                     .filter(Event.actor == "user:tester").distinct()}
    finally:
        db.dispose()
    assert actors == {"user:tester"}, actors
    assert kinds, "no write of the fuzzer reached the database"


def test_credentials_are_refused(rig: Rig) -> None:
    assert rig.status("/api/v1/machines") == "401"
    assert rig.status("/api/v1/machines", "Authorization: Bearer apl_wrong") == "401"
    assert rig.status("/api/v1/machines", "Authorization: Basic dGVzdGVyOng=") == "401"
    token = rig.app.api_token()
    bearer = f"Authorization: Bearer {token}"
    assert rig.status("/api/v1/machines", bearer) == "200"
    assert rig.status(f"/api/v1/machines/{MACHINE}/power", bearer, method="POST") == "400"
    # The remote CLI against the real server (gunicorn), run from inside the namespace.
    remote = [sys.executable, "-m", "appliance.cli", "--endpoint", LOCAL, "--token", token]
    shown = rig.ns.exec([*remote, "machines"]).stdout
    assert MACHINE in shown and "fuzz1" in shown, shown
    rig.ns.exec([*remote, "reservation", "add", "52:54:00:5c:00:03", "10.250.90.21"])
    rows = json.loads(rig.ns.exec([*remote, "--json", "reservation", "list"]).stdout)
    assert {r["mac"] for r in rows} >= {"52:54:00:5c:00:02", "52:54:00:5c:00:03"}
    refused = rig.ns.exec([*remote[:-1], "apl_wrong", "machines"], check=False)
    assert refused.returncode == 1 and "401" in refused.stderr, refused.stderr
    (listed,) = json.loads(rig.app.cli("token", "list", "--json").stdout)
    rig.app.cli("token", "revoke", str(listed["id"]))
    assert rig.status("/api/v1/machines", bearer) == "401"
    refused = rig.ns.exec([*remote, "machines"], check=False)
    assert refused.returncode == 1 and "revoked" in refused.stderr, refused.stderr
    assert rig.status(f"/api/v1/machines/{MACHINE}/identify", bearer, method="POST") == "401"
    # The description of the API stays public; unknown API paths answer JSON 404.
    assert rig.status("/api/v1/openapi.json") == "200"
    body = rig.ns.exec(["curl", "-sS", "-H", bearer, f"{LOCAL}/api/v1/no-such"]).stdout
    assert json.loads(body) == {"error": "no such API path: /api/v1/no-such"}
