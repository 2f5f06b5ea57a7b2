"""Power control inside the code: deadlines and retries, answers odd vendors give, the
encrypted password, settings refused by field, the worker's ordering and events, the
API. Real BMCs (ipmi_sim, a pyghmi BMC, sushy-tools) are in tests/integration and e2e.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from appliance import secretbox
from appliance.config import Config
from appliance.db import Database
from appliance.inventory import add_machine, as_dict
from appliance.models import Event, Machine, PowerRequest
from appliance.power import calls, control
from appliance.power import worker as power_worker
from appliance.power.driver import (
    AUTH,
    PROTOCOL,
    REFUSED,
    TIMEOUT,
    UNSUPPORTED,
    BmcAccess,
    BmcError,
    BootDevice,
    PowerDriver,
)
from appliance.power.ipmi import IpmiDriver
from appliance.power.worker import PowerPartWedged, PowerWorker
from tests.apiauth import authorize

pytestmark = pytest.mark.unit

ACCESS = BmcAccess("fake", "192.0.2.10", 623, "admin", "s3cret-pass")


class FakeDriver(PowerDriver):
    """Scripted behaviour per BMC address, shared by every instance (one per attempt)."""

    name = "fake"
    script: dict[str, list[Any]] = {}
    calls: list[tuple[str, str, tuple[Any, ...]]] = []
    lock = threading.Lock()

    def _step(self, method: str, *args: Any) -> Any:
        with self.lock:
            FakeDriver.calls.append((self.access.address, method, args))
            plan = FakeDriver.script.get(self.access.address, [])
            step = plan.pop(0) if plan else "on"
        if isinstance(step, BaseException):
            raise step
        if isinstance(step, tuple) and step[0] == "sleep":
            time.sleep(step[1])
            return "on"
        if isinstance(step, tuple) and step[0] == "hang":  # until the test lets go
            step[1].wait()
            return "on"
        return step

    def validate(self) -> None:
        self._step("validate")

    def get_power_state(self) -> str:
        return self._step("get_power_state")

    def set_power_state(self, action: str) -> None:
        self._step("set_power_state", action)

    def set_boot_device(self, device: str, persistent: bool, mode: str) -> None:
        self._step("set_boot_device", device, persistent, mode)

    def get_boot_device(self) -> BootDevice:
        self._step("get_boot_device")
        return BootDevice("pxe", False, "uefi")

    def identify(self, on: bool) -> None:
        self._step("identify", on)


@pytest.fixture
def fake_driver(monkeypatch: pytest.MonkeyPatch) -> type[FakeDriver]:
    FakeDriver.script = {}
    FakeDriver.calls = []
    real = calls.driver_class
    monkeypatch.setattr(calls, "driver_class",
                        lambda name: FakeDriver if name == "fake" else real(name))
    monkeypatch.setitem(control.DEFAULT_PORTS, "fake", 623)
    monkeypatch.setattr(control, "DRIVERS", (*calls.DRIVERS, "fake"))
    return FakeDriver


# -- calls: deadline, retries, backoff ------------------------------------------------

def test_transient_errors_are_retried_with_doubling_backoff(fake_driver) -> None:
    fake_driver.script[ACCESS.address] = [BmcError(TIMEOUT, "t1"), BmcError(TIMEOUT, "t2"),
                                          "off"]
    sleeps: list[float] = []
    outcome = calls.run_call(ACCESS, "status", {}, calls.CallPolicy(attempts=3, backoff=0.5),
                             sleep=sleeps.append)
    assert outcome.ok and outcome.result == {"power": "off"}
    assert outcome.attempts == 3 and sleeps == [0.5, 1.0]
    assert outcome.failures == ["attempt 1: timeout: t1", "attempt 2: timeout: t2"]


def test_auth_and_refusals_are_not_retried(fake_driver) -> None:
    for kind in (AUTH, REFUSED, PROTOCOL, UNSUPPORTED):
        fake_driver.script[ACCESS.address] = [BmcError(kind, "no")]
        outcome = calls.run_call(ACCESS, "status", {}, calls.CallPolicy(attempts=3),
                                 sleep=lambda s: None)
        assert not outcome.ok and outcome.attempts == 1 and outcome.error.kind == kind


def test_an_attempt_that_hangs_is_abandoned_at_the_deadline(fake_driver) -> None:
    fake_driver.script[ACCESS.address] = [("sleep", 5), ("sleep", 5)]
    started = time.monotonic()
    outcome = calls.run_call(ACCESS, "status", {},
                             calls.CallPolicy(timeout=0.3, attempts=2, backoff=0.1))
    took = time.monotonic() - started
    assert not outcome.ok and outcome.error.kind == TIMEOUT and outcome.attempts == 2
    assert "within 0.3 s" in str(outcome.error)
    assert took < 2.0


def test_a_library_bug_is_an_error_not_a_crash(fake_driver) -> None:
    fake_driver.script[ACCESS.address] = [KeyError("boom")]
    outcome = calls.run_call(ACCESS, "status", {}, sleep=lambda s: None)
    assert not outcome.ok and outcome.error.kind == PROTOCOL and "KeyError" in str(outcome.error)


def test_bad_arguments_are_refused_before_any_call(fake_driver) -> None:
    outcome = calls.run_call(ACCESS, "power", {"action": "explode"})
    assert not outcome.ok and "action: 'explode' is not one of" in str(outcome.error)
    outcome = calls.run_call(ACCESS, "boot", {"device": "pxe", "mode": "efi"})
    assert "mode: 'efi'" in str(outcome.error)
    assert fake_driver.calls == []


def test_sweep_runs_bmcs_in_parallel_and_keeps_order(fake_driver) -> None:
    accesses = [BmcAccess("fake", f"192.0.2.{i}", 623, "a", "p") for i in range(20)]
    for a in accesses:
        fake_driver.script[a.address] = [("sleep", 0.2)]
    started = time.monotonic()
    outcomes = calls.sweep(accesses, workers=20)
    assert time.monotonic() - started < 2.0  # 20 x 0.2 s serially would be 4 s
    assert [o.ok for o in outcomes] == [True] * 20


def test_access_repr_never_shows_the_password() -> None:
    assert "s3cret-pass" not in repr(ACCESS) and "s3cret-pass" not in ACCESS.describe()


# -- IPMI answers from odd BMCs -------------------------------------------------------

class StubSession:
    def __init__(self, responses: list[Any]) -> None:
        self.responses = responses
        self.sent: list[tuple[int, int, tuple[int, ...]]] = []
        self.ipmi_session = self
        self.once: list[bool] = []
        self.incommand = False
        self.evq: list[Any] = []

    def raw_command(self, netfn: int, command: int, data: tuple[int, ...] = (),
                    retry: bool = True, callback: Any = None) -> Any:
        self.sent.append((netfn, command, tuple(data)))
        self.once.append(not retry)
        response = self.responses.pop(0)
        if callback is not None:
            if response is not None:  # None: the answer is lost
                callback(response)
            return None
        if isinstance(response, BaseException):
            raise response
        return response


def _ipmi(responses: list[Any]) -> tuple[IpmiDriver, StubSession]:
    driver = IpmiDriver(BmcAccess("ipmi", "192.0.2.1", 623, "admin", "pw"), 5)
    stub = StubSession(responses)
    driver._command = stub
    return driver, stub


def ok(*data: int) -> dict[str, Any]:
    return {"netfn": 1, "command": 0, "code": 0, "data": bytearray(data)}


def test_ipmi_power_state_from_chassis_status() -> None:
    driver, stub = _ipmi([ok(0x01, 0, 0), ok(0x00, 0, 0)])
    assert driver.get_power_state() == "on" and driver.get_power_state() == "off"
    assert stub.sent[0] == (0x00, 0x01, ())


def test_ipmi_short_or_missing_answers_are_protocol_errors() -> None:
    for response in (ok(0x01), {"code": 0}, ["not", "a", "dict"]):
        driver, _ = _ipmi([response])
        with pytest.raises(BmcError) as info:
            driver.get_power_state()
        assert info.value.kind == PROTOCOL


def test_ipmi_completion_codes_are_named() -> None:
    driver, _ = _ipmi([{"code": 0xC1, "error": "Invalid command", "data": []}])
    with pytest.raises(BmcError) as info:
        driver.identify(True)
    assert info.value.kind == UNSUPPORTED and "command not supported" in str(info.value)
    driver, _ = _ipmi([{"code": 0xD5, "error": "x", "data": []}])
    with pytest.raises(BmcError) as info:
        driver.set_power_state("on")
    assert info.value.kind == REFUSED and "0xd5" in str(info.value)
    driver, _ = _ipmi([{"code": 0xFFFF, "error": "timeout"}])
    with pytest.raises(BmcError) as info:
        driver.get_power_state()
    assert info.value.kind == TIMEOUT


def test_ipmi_boot_device_clears_the_timer_first_and_sets_efi_and_persistence() -> None:
    driver, stub = _ipmi([ok(), ok()])
    driver.set_boot_device("pxe", persistent=False, mode="uefi")
    assert stub.sent == [(0x00, 0x08, (0x03, 0x08)),
                         (0x00, 0x08, (0x05, 0x80 | 0x20, 0x04, 0, 0, 0))]
    driver, stub = _ipmi([ok(), ok()])
    driver.set_boot_device("disk", persistent=True, mode="bios")
    assert stub.sent[1] == (0x00, 0x08, (0x05, 0x80 | 0x40, 0x08, 0, 0, 0))


def test_ipmi_boot_device_read_back() -> None:
    driver, _ = _ipmi([ok(0x01, 0x05, 0xE0, 0x04, 0, 0, 0)])
    assert driver.get_boot_device() == BootDevice("pxe", True, "uefi")
    driver, _ = _ipmi([ok(0x01, 0x05, 0x00, 0x08, 0, 0, 0)])  # valid bit clear
    assert driver.get_boot_device() == BootDevice("default", True, None)
    driver, _ = _ipmi([ok(0x01, 0x04, 0x80)])  # wrong parameter, too short
    with pytest.raises(BmcError):
        driver.get_boot_device()


def test_ipmi_cycle_of_a_machine_that_is_off_turns_it_on() -> None:
    driver, stub = _ipmi([ok(0x00, 0, 0), ok()])
    driver.set_power_state("cycle")
    assert stub.sent[1] == (0x00, 0x02, (0x01,))
    driver, stub = _ipmi([ok(0x01, 0, 0), ok()])
    driver.set_power_state("cycle")
    assert stub.sent[1] == (0x00, 0x02, (0x02,))
    assert stub.once == [False, True]  # a cycle is sent once, never resent by pyghmi


def test_ipmi_a_lost_answer_to_a_reset_is_a_timeout_not_a_resend(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from pyghmi.ipmi.private import session

    # no BMC here: pyghmi's event loop has nothing to wait for, so just let time pass
    monkeypatch.setattr(session.Session, "wait_for_rsp",
                        classmethod(lambda cls, timeout=None: time.sleep(timeout or 0)))
    driver, stub = _ipmi([None])
    driver.timeout = 1.0
    with pytest.raises(BmcError) as info:
        driver.set_power_state("reset")
    assert info.value.kind == TIMEOUT and "may have acted" in str(info.value)
    assert stub.once == [True] and len(stub.sent) == 1


# -- secrets and settings -------------------------------------------------------------

def test_passwords_are_encrypted_with_a_private_key(tmp_path: Path) -> None:
    stored = secretbox.encrypt(tmp_path, "hunter2")
    assert "hunter2" not in stored and stored.startswith(secretbox.PREFIX)
    assert secretbox.decrypt(tmp_path, stored) == "hunter2"
    mode = stat.S_IMODE(os.stat(secretbox.key_path(tmp_path)).st_mode)
    assert mode == 0o600
    secretbox.key_path(tmp_path).unlink()
    with pytest.raises(secretbox.SecretError, match="key file .* is missing"):
        secretbox.decrypt(tmp_path, stored)
    secretbox.encrypt(tmp_path, "other")  # a new key
    with pytest.raises(secretbox.SecretError, match="does not decrypt"):
        secretbox.decrypt(tmp_path, stored)


@pytest.mark.parametrize("changes, message", [
    ({"driver": "snmp"}, "driver: 'snmp' is not one of"),
    ({"address": ""}, "address: empty"),
    ({"address": "bmc one"}, "neither an IP address nor a host name"),
    ({"port": 70000}, "port: 70000"),
    ({"username": ""}, "username: empty"),
    ({"password": ""}, "password: empty"),
    ({"password": "x" * 21}, "password: IPMI 2.0 allows at most 20"),
    ({"driver": "redfish", "address": "ftp://bmc"}, "scheme 'ftp'"),
])
def test_bad_bmc_settings_are_refused_by_field(changes: dict[str, Any], message: str) -> None:
    base = {"driver": "ipmi", "address": "10.1.2.3", "username": "admin", "password": "pw"}
    with pytest.raises(control.PowerError, match=message):
        control.check_settings(control.BmcSettings(**{**base, **changes}))


def test_redfish_urls_and_default_ports_are_accepted() -> None:
    s = control.check_settings(control.BmcSettings("redfish", "https://bmc-1.example.net:8443",
                                                   "root", "pw"))
    assert s.port == 8443  # the URL's own port
    assert control.check_settings(control.BmcSettings("ipmi", "10.0.0.5", "a", "b")).port == 623


# -- the worker -----------------------------------------------------------------------

@pytest.fixture
def power_env(tmp_path: Path, fake_driver):  # type: ignore[no-untyped-def]
    config = Config(state_dir=str(tmp_path))
    config.power.call_timeout = 1.0
    config.power.attempts = 2
    config.power.backoff = 0.01
    config.power.poll_interval = 0
    db = Database(config.effective_database_url)
    db.migrate()
    yield config, db
    db.dispose()


def _machine_with_bmc(config: Config, db: Database, mac: str, address: str) -> int:
    with db.session() as session:
        machine = add_machine(session, mac, None)
        control.set_bmc(config, session, machine,
                        control.BmcSettings("fake", address, "admin", "pw"), "test")
        session.flush()
        return machine.id


def _drain(worker: PowerWorker, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        worker.claim_and_submit()
        with worker.db.session() as session:
            pending = session.query(PowerRequest).filter(
                PowerRequest.state.in_(("queued", "running"))).count()
        if not pending:
            return
        time.sleep(0.02)
    raise AssertionError("requests did not finish")


def test_requests_run_in_order_per_machine_and_record_events(power_env, fake_driver) -> None:
    config, db = power_env
    machine_id = _machine_with_bmc(config, db, "52:54:00:00:01:01", "192.0.2.21")
    with db.session() as session:
        machine = session.get(Machine, machine_id)
        control.request(session, machine, "boot", {"device": "pxe"}, "cli:alice")
        control.request(session, machine, "power", {"action": "cycle"}, "cli:alice")
        machine.arch = "uefi-x64"
        control.request(session, machine, "boot", {"device": "disk", "persistent": True},
                        "cli:alice")
    worker = PowerWorker(config, db)
    _drain(worker)
    worker.close()
    methods = [c[1] for c in fake_driver.calls]
    assert methods == ["set_boot_device", "set_power_state", "set_boot_device"]
    assert fake_driver.calls[0][2] == ("pxe", False, "bios")
    assert fake_driver.calls[2][2] == ("disk", True, "uefi")  # mode from the machine's arch
    with db.session() as session:
        events = [e for e in session.query(Event).order_by(Event.id) if e.kind == "power"]
        assert [e.actor for e in events] == ["cli:alice"] * 3
        assert events[1].message.startswith("power cycle: done in")
        assert events[1].details["attempts"] == 1 and "duration_s" in events[1].details
        assert session.get(Machine, machine_id).power_state == "on"


def test_one_slow_bmc_does_not_hold_the_others(power_env, fake_driver) -> None:
    config, db = power_env
    slow = _machine_with_bmc(config, db, "52:54:00:00:02:01", "192.0.2.31")
    fast = [_machine_with_bmc(config, db, f"52:54:00:00:02:1{i}", f"192.0.2.4{i}")
            for i in range(5)]
    fake_driver.script["192.0.2.31"] = [("sleep", 0.8)]
    with db.session() as session:
        for machine_id in [slow, *fast]:
            control.request(session, session.get(Machine, machine_id), "status", {}, "test")
    worker = PowerWorker(config, db)
    worker.claim_and_submit()
    deadline = time.monotonic() + 0.6
    while time.monotonic() < deadline:
        with db.session() as session:
            done = session.query(PowerRequest).filter(PowerRequest.state == "succeeded").count()
        if done == 5:
            break
        time.sleep(0.02)
    with db.session() as session:
        states = {r.machine_id: r.state for r in session.query(PowerRequest)}
    assert all(states[m] == "succeeded" for m in fast) and states[slow] == "running"
    _drain(worker)
    worker.close()


def test_failures_are_events_with_the_reason(power_env, fake_driver) -> None:
    config, db = power_env
    machine_id = _machine_with_bmc(config, db, "52:54:00:00:03:01", "192.0.2.51")
    fake_driver.script["192.0.2.51"] = [BmcError(AUTH, "Incorrect password provided")]
    with db.session() as session:
        control.request(session, session.get(Machine, machine_id), "power", {"action": "off"},
                        "api:127.0.0.1")
    worker = PowerWorker(config, db)
    _drain(worker)
    worker.close()
    with db.session() as session:
        req = session.query(PowerRequest).one()
        assert (req.state, req.error_kind, req.attempts) == ("failed", AUTH, 1)
        event = session.query(Event).filter(Event.kind == "power-failed").one()
        assert "power off failed after 1 attempt(s)" in event.message
        assert "auth: Incorrect password provided" in event.message
        assert event.actor == "api:127.0.0.1"


def test_requests_left_running_by_a_crash_are_failed_as_unknown(power_env) -> None:
    config, db = power_env
    machine_id = _machine_with_bmc(config, db, "52:54:00:00:04:01", "192.0.2.61")
    with db.session() as session:
        req = control.request(session, session.get(Machine, machine_id), "power",
                              {"action": "off"}, "test")
        req.state = "running"
    worker = PowerWorker(config, db)
    assert worker.recover() == 1
    worker.close()
    with db.session() as session:
        req = session.query(PowerRequest).one()
        assert req.state == "failed" and "unknown" in req.error


def test_polling_records_changes_and_unreachability_once(power_env, fake_driver) -> None:
    config, db = power_env
    config.power.poll_interval = 1
    machine_id = _machine_with_bmc(config, db, "52:54:00:00:05:01", "192.0.2.71")
    fake_driver.script["192.0.2.71"] = [
        "on", "on", BmcError(REFUSED, "busy"), BmcError(REFUSED, "busy"), "off"]
    worker = PowerWorker(config, db)
    worker.next_poll[machine_id] = 0.0  # due now (new machines get a random first slot)
    for step in range(5):
        assert worker.poll_due(1002.0 + step * 2) == 1
        deadline = time.monotonic() + 5
        while worker.busy and time.monotonic() < deadline:
            time.sleep(0.01)
    worker.close()
    with db.session() as session:
        events = [(e.actor, e.kind) for e in session.query(Event).order_by(Event.id)
                  if e.actor == "poller"]
        machine = session.get(Machine, machine_id)
        assert events == [("poller", "power-changed"), ("poller", "bmc-unreachable"),
                          ("poller", "bmc-reachable")]
        assert machine.power_state == "off" and machine.power_error is None


def test_a_request_without_a_bmc_is_refused(power_env) -> None:
    _, db = power_env
    with db.session() as session:
        machine = add_machine(session, "52:54:00:00:06:01", "node6")
        with pytest.raises(control.PowerError, match="node6 has no BMC"):
            control.request(session, machine, "power", {"action": "on"}, "test")


def test_an_unclaimed_request_is_cancelled_not_left_to_fire_later(power_env) -> None:
    config, db = power_env
    machine_id = _machine_with_bmc(config, db, "52:54:00:00:07:01", "192.0.2.81")
    with db.session() as session:
        req = control.request(session, session.get(Machine, machine_id), "power",
                              {"action": "off"}, "test")
        request_id = req.id
    with pytest.raises(control.PowerError, match="no power part is running"):
        control.wait(db, request_id, timeout=5, claim_timeout=0.3, interval=0.05)
    with db.session() as session:
        assert session.get(PowerRequest, request_id).state == "cancelled"


def test_machine_rows_never_carry_the_password(power_env) -> None:
    config, db = power_env
    machine_id = _machine_with_bmc(config, db, "52:54:00:00:08:01", "192.0.2.91")
    with db.session() as session:
        machine = session.get(Machine, machine_id)
        assert "bmc_password" not in as_dict(machine)
        assert control.bmc_summary(machine)["password_set"] is True
        assert "pw" not in str(control.bmc_summary(machine).values())
        assert control.bmc_access(config, machine).password == "pw"


# -- the API --------------------------------------------------------------------------

def test_api_power_endpoints(power_env, fake_driver) -> None:
    from appliance.web import create_app

    config, db = power_env
    _machine_with_bmc(config, db, "52:54:00:00:09:01", "192.0.2.99")
    with db.session() as session:
        session.get(Machine, 1).hostname = "node9"
    client = create_app(config, db).test_client()
    assert client.get("/api/v1/machines/node9/bmc").status_code == 401
    authorize(client, db, "alice")
    r = client.get("/api/v1/machines/node9/bmc")
    assert r.status_code == 200 and r.json["bmc"]["password_set"] is True
    assert "password" not in r.json["bmc"]
    r = client.post("/api/v1/machines/node9/power", json={"action": "cycle"})
    assert r.status_code == 202 and r.json["state"] == "queued"
    request_id = r.json["id"]
    r = client.post("/api/v1/machines/node9/power", json={"action": "explode"})
    assert r.status_code == 400 and r.json["error"].startswith("action:")
    r = client.post("/api/v1/machines/node9/boot", json={"device": "pxe", "persistent": "yes"})
    assert r.status_code == 400 and r.json["error"].startswith("persistent:")
    r = client.put("/api/v1/machines/node9/bmc", json={"address": "10.0.0.9",
                                                        "username": "root", "password": ""})
    assert r.status_code == 400 and r.json["error"].startswith("password:")
    r = client.put("/api/v1/machines/node9/bmc", json={"address": "10.0.0.9", "user": "x"})
    assert r.status_code == 400 and r.json["error"] == "user: unknown field"
    assert client.get("/api/v1/machines/nope/power").status_code == 404
    worker = PowerWorker(config, db)
    _drain(worker)
    worker.close()
    r = client.get(f"/api/v1/power-requests/{request_id}")
    assert r.json["state"] == "succeeded" and r.json["actor"] == "user:alice"
    config.http.api_networks = "127.0.0.0/8"
    r = client.get("/api/v1/machines/node9/power",
                   environ_base={"REMOTE_ADDR": "10.250.40.7"})
    assert r.status_code == 403 and "http.api_networks" in r.json["error"]


def test_a_cycle_that_timed_out_is_not_repeated(fake_driver) -> None:
    fake_driver.script[ACCESS.address] = [BmcError(TIMEOUT, "lost"), "on"]
    outcome = calls.run_call(ACCESS, "power", {"action": "cycle"},
                             calls.CallPolicy(attempts=3), sleep=lambda s: None)
    assert not outcome.ok and outcome.attempts == 1
    assert "could reboot the machine twice" in outcome.failures[-1]
    fake_driver.script[ACCESS.address] = [BmcError(TIMEOUT, "lost"), "on"]
    outcome = calls.run_call(ACCESS, "power", {"action": "on"},
                             calls.CallPolicy(attempts=3), sleep=lambda s: None)
    assert outcome.ok and outcome.attempts == 2


def test_redfish_default_port_follows_the_url() -> None:
    def port(address: str) -> int:
        return control.check_settings(
            control.BmcSettings("redfish", address, "root", "pw")).port or 0

    assert (port("http://10.0.0.5"), port("https://bmc"), port("http://bmc:8000/"),
            port("10.0.0.5")) == (80, 443, 8000, 443)


def test_a_failed_request_cancels_the_machines_later_ones(power_env, fake_driver) -> None:
    config, db = power_env
    machine_id = _machine_with_bmc(config, db, "52:54:00:00:0a:01", "192.0.2.101")
    fake_driver.script["192.0.2.101"] = [BmcError(REFUSED, "no")]
    with db.session() as session:
        machine = session.get(Machine, machine_id)
        control.request(session, machine, "boot", {"device": "pxe"}, "api:x")
        control.request(session, machine, "power", {"action": "cycle"}, "api:x")
    worker = PowerWorker(config, db)
    _drain(worker)
    worker.close()
    assert [c[1] for c in fake_driver.calls] == ["set_boot_device"]  # no cycle into disk
    with db.session() as session:
        states = [r.state for r in session.query(PowerRequest).order_by(PowerRequest.id)]
        assert states == ["failed", "cancelled"]
        assert session.query(Event).filter(Event.kind == "power-cancelled").count() == 1


def test_a_request_waiting_behind_a_busy_machine_is_not_cancelled(power_env) -> None:
    from appliance.db import publish_counters

    config, db = power_env
    machine_id = _machine_with_bmc(config, db, "52:54:00:00:0b:01", "192.0.2.111")
    publish_counters(db, "power", {"heartbeat": int(time.time())})  # a live power part
    with db.session() as session:
        req = control.request(session, session.get(Machine, machine_id), "status", {}, "t")
        request_id = req.id
    with pytest.raises(control.PowerError, match="still queued after 0.6 s"):
        control.wait(db, request_id, timeout=0.6, claim_timeout=0.2, interval=0.05)
    with db.session() as session:
        assert session.get(PowerRequest, request_id).state == "queued"


def test_credentials_in_a_redfish_url_are_refused() -> None:
    for address, message in (("https://admin:pw@10.0.0.1", "no user or password"),
                             ("https://10.0.0.1/redfish/v1", "only scheme, host and port"),
                             ("https://10.0.0.1:99999", "invalid port")):
        with pytest.raises(control.PowerError, match=message):
            control.check_settings(control.BmcSettings("redfish", address, "root", "pw"))
    assert "pw" not in repr(control.BmcSettings("ipmi", "10.0.0.1", "root", "pw"))


def test_api_treats_ipv4_mapped_loopback_as_loopback(power_env) -> None:
    from appliance.web import create_app

    config, db = power_env
    config.http.api_networks = "127.0.0.0/8"
    client = create_app(config, db).test_client()
    authorize(client, db)
    r = client.get("/api/v1/power-requests/1", environ_base={"REMOTE_ADDR": "::ffff:127.0.0.1"})
    assert r.status_code == 404  # allowed in, and the request does not exist
    r = client.get("/api/v1/power-requests/1", environ_base={"REMOTE_ADDR": "::ffff:10.0.0.7"},
                   headers={"X-Forwarded-For": "127.0.0.1"})
    assert r.status_code == 403


def test_pyghmi_session_table_locks_are_one_lock() -> None:
    """pyghmi takes its two session-table locks in both orders (a lock-order deadlock
    that wedged every later IPMI call of the process); the driver makes them one."""
    from pyghmi.ipmi.private import session

    from appliance.power import ipmi

    ipmi._one_pyghmi_session_lock()
    assert session.WAITING_SESSIONS is session.KEEPALIVE_SESSIONS


def test_a_call_stuck_in_the_library_ends_the_part_for_a_fresh_one(
        power_env, fake_driver, monkeypatch: pytest.MonkeyPatch) -> None:
    config, db = power_env
    config.power.call_timeout = 0.2
    config.power.attempts = 1
    monkeypatch.setattr(power_worker, "WEDGED_FACTOR", 5)
    stuck = _machine_with_bmc(config, db, "52:54:00:00:09:01", "192.0.2.91")
    fine = _machine_with_bmc(config, db, "52:54:00:00:09:02", "192.0.2.92")
    release = threading.Event()
    fake_driver.script["192.0.2.91"] = [("hang", release)]
    with db.session() as session:
        for machine_id in (stuck, fine):
            control.request(session, session.get(Machine, machine_id), "status", {}, "test")
    worker = PowerWorker(config, db)
    stop = threading.Event()
    raised: list[BaseException] = []

    def serve() -> None:
        try:
            worker.serve(stop)
        except PowerPartWedged as exc:
            raised.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    started = time.monotonic()
    thread.start()
    try:
        thread.join(10)
        assert not thread.is_alive(), "the loop kept running with a call stuck for good"
        took = time.monotonic() - started
        # the deadline (0.2 s) + the wedge limit past it (5 x 0.2 s), within a round
        assert 1.2 <= took < 4.0, took
        assert raised and "stuck for" in str(raised[0])
        with db.session() as session:
            states = {r.machine_id: r.state for r in session.query(PowerRequest)}
        assert states == {stuck: "failed", fine: "succeeded"}
    finally:
        stop.set()
        release.set()
        worker.close()


def test_a_slow_call_that_ends_is_not_taken_for_a_wedge(
        power_env, fake_driver, monkeypatch: pytest.MonkeyPatch) -> None:
    config, db = power_env
    config.power.call_timeout = 0.2
    config.power.attempts = 1
    monkeypatch.setattr(power_worker, "WEDGED_FACTOR", 5)
    machine_id = _machine_with_bmc(config, db, "52:54:00:00:09:03", "192.0.2.93")
    fake_driver.script["192.0.2.93"] = [("sleep", 1.0)]  # past the straggler wait
    with db.session() as session:
        control.request(session, session.get(Machine, machine_id), "status", {}, "test")
    worker = PowerWorker(config, db)
    stop = threading.Event()
    thread = threading.Thread(target=worker.serve, args=(stop,), daemon=True)
    thread.start()
    try:
        time.sleep(2.5)  # the wedge limit would have passed had the call not ended
        assert thread.is_alive() and worker.wedged_for(time.monotonic()) == 0.0
    finally:
        stop.set()
        thread.join(5)
        worker.close()
