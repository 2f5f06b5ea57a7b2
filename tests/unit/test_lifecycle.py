"""The lifecycle state machine: steps, refusals, races, reimage, phases, timeouts and the
lifecycle part's contract-check bookkeeping (the SSH check itself is tested against a
real sshd in tests/integration/test_contract_ssh.py)."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from appliance.lifecycle import operations
from appliance.lifecycle import worker as lifecycle_worker
from appliance.lifecycle.contract import ContractResult
from appliance.lifecycle.states import LifecycleError
from appliance.models import Event, Machine, PowerRequest, utcnow
from appliance.power import control
from tests.apiauth import authorize
from tests.unit.test_provisioning import MAC, setup  # noqa: F401 - the fixture

pytestmark = pytest.mark.unit

KEYS = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOperatorKeyOperatorKeyOperatorKeyOper op@desk"]
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostKeyHostKeyHostKeyHostKeyHostKeyHostK root@m"


def _machine(session: Any) -> Machine:
    return session.scalar(select(Machine).where(Machine.mac == MAC))


def _with_bmc(config: Any, db: Any) -> None:
    with db.session() as session:
        control.set_bmc(config, session, _machine(session),
                        control.BmcSettings("ipmi", "127.0.0.1", "admin", "pw"), "test")


def _reimage(config: Any, db: Any, catalog: Any, **kw: Any) -> dict[str, Any]:
    with db.session() as session:
        return operations.reimage(config, session, catalog, _machine(session), "tiny",
                                  actor="test", values={"ssh_authorized_keys": KEYS}, **kw)


def _states(db: Any) -> list[tuple[str, dict]]:
    with db.session() as session:
        return [(e.message, e.details) for e in session.scalars(
            select(Event).where(Event.kind == "state").order_by(Event.id))]


def test_reimage_with_a_bmc_queues_pxe_then_cycle_and_waits_for_them(setup) -> None:  # noqa: F811
    config, db, catalog = setup
    _with_bmc(config, db)
    deployment = _reimage(config, db, catalog, reason="first deployment")
    assert deployment["number"] == 1 and deployment["power"] == "bmc"
    with db.session() as session:
        machine = _machine(session)
        assert (machine.state, machine.phase) == ("provisioning", "power")
        assert machine.instance_id == deployment["instance_id"]
        assert machine.instance_id.startswith("i-") and len(machine.instance_id) == 19
        assert machine.install_token and machine.seed_token
        assert machine.phase_deadline is not None
        reqs = list(session.scalars(select(PowerRequest).order_by(PowerRequest.id)))
        assert [(r.operation, r.args.get("device") or r.args.get("action"), r.purpose)
                for r in reqs] == [("boot", "pxe", "reimage"), ("power", "cycle", "reimage")]
        # the first request done: still waiting for the cycle
        reqs[0].state = "succeeded"
        operations.power_request_ended(config, session, reqs[0])
        assert machine.phase == "power"
        reqs[1].state = "succeeded"
        operations.power_request_ended(config, session, reqs[1])
        assert (machine.state, machine.phase) == ("provisioning", "boot")
    messages = [m for m, _ in _states(db)]
    assert messages[0] == "discovered -> provisioning/power: first deployment"
    assert messages[1].startswith("provisioning/power -> provisioning/boot")


def test_a_failed_bmc_request_fails_the_deployment_with_the_reason(setup) -> None:  # noqa: F811
    config, db, catalog = setup
    _with_bmc(config, db)
    _reimage(config, db, catalog)
    with db.session() as session:
        req = session.scalars(select(PowerRequest).order_by(PowerRequest.id)).first()
        req.state, req.error, req.error_kind = "failed", "timeout: no answer", "timeout"
        operations.power_request_ended(config, session, req)
        machine = _machine(session)
        assert machine.state == "failed"
        assert machine.state_reason == "BMC boot failed: timeout: no answer"


def test_the_whole_way_to_ready_and_the_install_token_dies(setup) -> None:  # noqa: F811
    config, db, catalog = setup
    deployment = _reimage(config, db, catalog)
    assert deployment["power"] == "manual"
    with db.session() as session:
        machine = _machine(session)
        assert (machine.state, machine.phase) == ("provisioning", "boot")
        assert any(e.kind == "power-manual" for e in machine.events)
        token = machine.install_token
        operations.booted(config, session, machine, "10.0.0.5")
        assert (machine.state, machine.phase) == ("installing", "installer")
        operations.booted(config, session, machine, "10.0.0.5")  # a second fetch: no step
        operations.install_done(config, session, machine, "tiny", "10.0.0.5")
        assert machine.phase == "first-boot"
        with pytest.raises(LifecycleError, match="phone-home for instance 'i-0'"):
            operations.phone_home(config, session, machine, {"instance_id": "i-0"}, "x")
        with pytest.raises(LifecycleError, match="without SSH host keys"):
            operations.phone_home(config, session, machine,
                                  {"instance_id": machine.instance_id}, "x")
        operations.phone_home(config, session, machine, {
            "instance_id": machine.instance_id, "hostname": "m1",
            "pub_key_ed25519": HOST_KEY + "\n", "pub_key_dsa": ""}, "10.0.0.5")
        assert machine.phase == "contract"
        assert machine.ssh_host_keys == {"ssh-ed25519": HOST_KEY}
        with pytest.raises(LifecycleError, match="cannot phone-home a machine that is "
                                                 "installing/contract"):
            operations.phone_home(config, session, machine, {
                "instance_id": machine.instance_id, "pub_key_ed25519": HOST_KEY}, "x")
        operations.contract_passed(config, session, machine, {"auth_methods": ["publickey"]})
        assert machine.state == "ready" and machine.phase is None
        assert machine.install_token is None and token
        assert machine.contract["ok"] is True
    steps = [d["step"] for _, d in _states(db)]
    assert steps == ["reimage", "booted", "install-done", "phone-home", "contract-passed"]
    assert all("previous_phase_s" in d for _, d in _states(db)[1:])


@pytest.mark.parametrize("step, call", [
    ("accept", lambda c, s, m: operations.accept(c, s, m, "t")),
    ("install-done", None),
    ("fail", lambda c, s, m: operations.fail(c, s, m, "x", actor="t")),
])
def test_illegal_steps_are_refused_with_a_message(setup, step, call) -> None:  # noqa: F811
    config, db, catalog = setup
    _to_contract(config, db, catalog)
    with db.session() as session:
        operations.contract_passed(config, session, _machine(session), {})
    with db.session() as session:
        machine = _machine(session)
        if call is None:  # install-done on a ready machine is ignored, not a step
            operations.install_done(config, session, machine, "tiny", "x")
            assert machine.state == "ready"
            return
        with pytest.raises(LifecycleError, match=f"cannot {step} a machine that is ready"):
            call(config, session, machine)


def test_reimage_refuses_what_would_not_render_and_changes_nothing(setup) -> None:  # noqa: F811
    config, db, catalog = setup
    (config.images_dir / "tiny" / "linux").unlink()
    with pytest.raises(LifecycleError, match="not reimaged.*tiny/linux"):
        _reimage(config, db, catalog)
    with pytest.raises(LifecycleError, match="ssh_authorized_keys"):
        with db.session() as session:
            operations.reimage(config, session, catalog, _machine(session), "tiny",
                               actor="t")
    with pytest.raises(LifecycleError, match="installs nothing"):
        with db.session() as session:
            operations.reimage(config, session, catalog, _machine(session), "local",
                               actor="t")
    with pytest.raises(LifecycleError, match="not defined"):
        with db.session() as session:
            operations.reimage(config, session, catalog, _machine(session), "nope",
                               actor="t")
    with db.session() as session:
        machine = _machine(session)
        assert (machine.state, machine.instance_id, machine.install_token) == \
            ("discovered", None, None)
        assert session.scalar(select(PowerRequest.id)) is None
    assert _states(db) == []


def test_asking_twice_does_not_start_twice_but_new_settings_do(setup) -> None:  # noqa: F811
    config, db, catalog = setup
    _with_bmc(config, db)
    first = _reimage(config, db, catalog)
    again = _reimage(config, db, catalog)
    assert again["unchanged"] and again["instance_id"] == first["instance_id"]
    with db.session() as session:
        assert len(list(session.scalars(select(PowerRequest)))) == 2
        changed = operations.reimage(config, session, catalog, _machine(session), "tiny",
                                     actor="t", values={"ssh_authorized_keys": KEYS,
                                                        "disks": 2})
    assert changed["number"] == 2 and changed["instance_id"] != first["instance_id"]


def test_a_reimage_makes_the_last_deployment_credentials_worthless(setup) -> None:  # noqa: F811
    config, db, catalog = setup
    _reimage(config, db, catalog)
    with db.session() as session:
        machine = _machine(session)
        old = (machine.install_token, machine.seed_token, machine.instance_id)
        operations.booted(config, session, machine, "x")
    with db.session() as session:
        operations.reimage(config, session, catalog, _machine(session), "tiny", actor="t",
                           values={"ssh_authorized_keys": KEYS, "disks": 3})
        machine = _machine(session)
        new = (machine.install_token, machine.seed_token, machine.instance_id)
    assert all(a != b for a, b in zip(old, new, strict=True))


def test_concurrent_steps_on_one_machine_cannot_both_win(setup) -> None:  # noqa: F811
    config, db, catalog = setup
    _reimage(config, db, catalog)
    # two requests read the machine, then both try to move it
    with db.sessions() as first, db.sessions() as second:
        a, b = _machine(first), _machine(second)
        assert a.state_serial == b.state_serial
        operations.booted(config, first, a, "a")
        first.commit()
        with pytest.raises(LifecycleError, match="changed by another request"):
            operations.fail(config, second, b, "timed out", actor="t")
        second.rollback()
    with db.session() as session:
        assert _machine(session).state == "installing"
    # and for real, from threads
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def go(i: int) -> None:
        with db.sessions() as session:
            machine = _machine(session)
            barrier.wait()
            try:
                operations.install_done(config, session, machine, "tiny", f"t{i}")
                session.commit()
                outcomes.append("won")
            except Exception as exc:  # noqa: BLE001 - LifecycleError or SQLite busy
                session.rollback()
                outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert outcomes.count("won") == 1, outcomes
    assert len([m for m, _ in _states(db) if "first-boot" in m]) == 1


def test_phases_that_outlive_their_limit_fail_the_machine(setup) -> None:  # noqa: F811
    config, db, catalog = setup
    config.lifecycle.boot_timeout = 60
    _reimage(config, db, catalog)
    with db.session() as session:
        assert operations.expire_phases(config, session) == []
        machine = _machine(session)
        machine.phase_started_at = utcnow() - dt.timedelta(seconds=61)
        machine.phase_deadline = utcnow() - dt.timedelta(seconds=1)
        assert operations.expire_phases(config, session) == [MAC]
        assert machine.state == "failed"
        assert machine.state_reason.startswith("phase boot timed out after 61 s: the machine "
                                               "did not boot from the network")
    config.lifecycle.boot_timeout = 0  # no limit: no deadline at all
    _reimage(config, db, catalog)
    with db.session() as session:
        assert _machine(session).phase_deadline is None


def test_decommission_ends_the_deployment(setup) -> None:  # noqa: F811
    config, db, catalog = setup
    _with_bmc(config, db)
    _reimage(config, db, catalog)
    with db.session() as session:
        operations.decommission(config, session, _machine(session), actor="t")
        machine = _machine(session)
        assert (machine.state, machine.bootenv) == ("available", "discovery")
        assert machine.install_token is machine.seed_token is machine.instance_id is None
        reqs = {(r.operation, r.state, r.purpose) for r in session.scalars(select(PowerRequest))}
        assert reqs == {("boot", "cancelled", "reimage"), ("power", "cancelled", "reimage"),
                        ("power", "queued", "decommission")}


def test_accept_only_from_discovered(setup) -> None:  # noqa: F811
    config, db, _ = setup
    with db.session() as session:
        operations.accept(config, session, _machine(session), "t")
        assert _machine(session).state == "available"
        with pytest.raises(LifecycleError, match="cannot accept a machine that is available"):
            operations.accept(config, session, _machine(session), "t")


def _to_contract(config: Any, db: Any, catalog: Any) -> None:
    _reimage(config, db, catalog)
    with db.session() as session:
        machine = _machine(session)
        operations.booted(config, session, machine, "x")
        operations.install_done(config, session, machine, "tiny", "x")
        operations.phone_home(config, session, machine, {
            "instance_id": machine.instance_id, "pub_key_ed25519": HOST_KEY}, "x")
        from appliance.models import Reservation, Subnet
        subnet = Subnet(network="10.0.0.0/24", lease_seconds=3600)
        session.add(subnet)
        session.add(Reservation(mac=MAC, ip="10.0.0.50", subnet=subnet))


@pytest.mark.parametrize("results, final", [
    ([ContractResult(True, "", {"auth_methods": ["publickey"]})], "ready"),
    ([ContractResult(False, "password login is offered", {"retryable": False})], "failed"),
    ([ContractResult(False, "connection refused", {"retryable": True}),
      ContractResult(True, "", {})], "ready"),
])
def test_the_lifecycle_part_checks_the_contract_and_retries_unreachable(
        setup, monkeypatch: pytest.MonkeyPatch, results, final) -> None:  # noqa: F811
    config, db, catalog = setup
    _to_contract(config, db, catalog)
    calls: list[tuple] = []

    def fake_check(address: str, host_keys: list[str], keys: list[str], **kw: Any):
        calls.append((address, host_keys, keys, kw["user"], kw["port"]))
        return results[len(calls) - 1]

    monkeypatch.setattr(lifecycle_worker, "check_contract", fake_check)
    monkeypatch.setattr(lifecycle_worker, "RETRY_INTERVAL", 0.0)
    part = lifecycle_worker.LifecycleWorker(config, db, catalog)
    for _ in range(len(results)):
        for job in part.due_checks(float("inf")):
            part.run_check(job)
    part.close()
    assert calls[0] == ("10.0.0.50", [HOST_KEY], KEYS, "root", 22)
    with db.session() as session:
        machine = _machine(session)
        assert machine.state == final
        if final == "failed":
            assert machine.state_reason == ("post-provision contract check failed: password "
                                            "login is offered")
            assert machine.contract["ok"] is False


def test_a_stale_check_does_not_touch_a_reimaged_machine(
        setup, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    config, db, catalog = setup
    _to_contract(config, db, catalog)
    part = lifecycle_worker.LifecycleWorker(config, db, catalog)
    (job,) = part.due_checks(0.0)
    with db.session() as session:  # reimaged while the check runs
        operations.reimage(config, session, catalog, _machine(session), "tiny", actor="t",
                           values={"ssh_authorized_keys": KEYS, "disks": 4})
    monkeypatch.setattr(lifecycle_worker, "check_contract",
                        lambda *a, **k: ContractResult(True, "", {}))
    part.run_check(job)
    part.close()
    with db.session() as session:
        assert _machine(session).state == "provisioning"


def test_config_refuses_bad_lifecycle_settings(tmp_path: Path) -> None:
    from appliance.config import ConfigError, load_config

    path = tmp_path / "a.toml"
    path.write_text("[lifecycle]\nboot_timeout = -1\n")
    with pytest.raises(ConfigError, match="lifecycle.boot_timeout"):
        load_config(path, env={})
    path.write_text("[lifecycle]\ncontract_user = 'root; rm'\n")
    with pytest.raises(ConfigError, match="lifecycle.contract_user"):
        load_config(path, env={})


def test_the_api_reimages_and_refuses_by_field(setup) -> None:  # noqa: F811
    from appliance.web import create_app

    config, db, _ = setup
    client = create_app(config, db).test_client()
    authorize(client, db, "bob")
    local = {"REMOTE_ADDR": "127.0.0.1"}
    r = client.post(f"/api/v1/machines/{MAC}/reimage", json={"bootenv": "tiny"},
                    environ_base=local)
    assert r.status_code == 409 and "ssh_authorized_keys" in r.json["error"]
    r = client.post(f"/api/v1/machines/{MAC}/reimage",
                    json={"bootenv": "tiny", "params": {"disks": "two"}}, environ_base=local)
    assert r.status_code == 400 and "disks" in r.json["error"]
    r = client.post(f"/api/v1/machines/{MAC}/reimage", json={"bootenv": "tiny", "x": 1},
                    environ_base=local)
    assert r.status_code == 400 and r.json["error"] == "x: unknown field"
    body = {"bootenv": "tiny", "params": {"ssh_authorized_keys": KEYS}, "reason": "api"}
    r = client.post(f"/api/v1/machines/{MAC}/reimage", json=body, environ_base=local)
    assert r.status_code == 202, r.json
    assert (r.json["state"], r.json["phase"]) == ("provisioning", "boot")
    assert r.json["deployment"]["actor"] == "user:bob"
    again = client.post(f"/api/v1/machines/{MAC}/reimage", json=body, environ_base=local)
    assert again.status_code == 200 and again.json["deployment"]["unchanged"]
    shown = client.get(f"/api/v1/machines/{MAC}/lifecycle", environ_base=local).json
    assert shown["instance_id"] == r.json["instance_id"] and "seed_token" not in str(shown)
    r = client.post(f"/api/v1/machines/{MAC}/accept", environ_base=local)
    assert r.status_code == 409 and "cannot accept a machine that is provisioning" in \
        r.json["error"]
    r = client.post(f"/api/v1/machines/{MAC}/decommission", json={"reason": "rack moved"},
                    environ_base=local)
    assert r.status_code == 200 and r.json["state"] == "available"
    config.http.api_networks = "127.0.0.0/8"
    r = client.post(f"/api/v1/machines/{MAC}/decommission",
                    environ_base={"REMOTE_ADDR": "10.0.0.9"})
    assert r.status_code == 403 and "http.api_networks" in r.json["error"]


def test_install_token_is_dead_after_ready_and_the_seed_lives_on(setup) -> None:  # noqa: F811
    from appliance.web import create_app

    config, db, catalog = setup
    _reimage(config, db, catalog)
    client = create_app(config, db).test_client()
    with db.session() as session:
        machine = _machine(session)
        operations.booted(config, session, machine, "x")
        install, seed, iid = machine.install_token, machine.seed_token, machine.instance_id
    assert client.get(f"/install/{install}/answer.cfg").status_code == 200
    assert client.post(f"/install/{install}/done").status_code == 200
    with db.session() as session:
        assert _machine(session).phase == "first-boot"
    r = client.post(f"/phone-home/{seed}", data={"instance_id": iid, "hostname": "m",
                                                 "pub_key_ed25519": HOST_KEY})
    assert r.status_code == 200, r.text
    with db.session() as session:
        operations.contract_passed(config, session, _machine(session), {})
        assert _machine(session).state == "ready"
    assert client.get(f"/install/{install}/answer.cfg").status_code == 404
    assert client.post(f"/install/{install}/log", data="x").status_code == 404
    assert client.post(f"/install/{install}/done").status_code == 404
    assert client.get(f"/nocloud/{seed}/meta-data").status_code == 200  # lives on
    r = client.post(f"/phone-home/{seed}", data={"instance_id": iid,
                                                 "pub_key_ed25519": HOST_KEY})
    assert r.status_code == 409  # once per deployment
