"""The simulated-BMC tooling itself (tests/ipmisim.py, tests/bmcfault.py) against ipmitool.

A fleet of three OpenIPMI ``ipmi_sim`` BMCs on 127.0.0.1: ipmitool's power and boot-device
commands must agree with what each BMC's chassis control program recorded, and the UDP
fault proxy must do what its modes say (ipmitool still answered through drop-alternate,
failing in time through a blackhole). The appliance's own IPMI driver is tested elsewhere;
these tests only prove the tools those tests stand on.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator

import pytest

from tests import ipmisim
from tests.bmcfault import FaultProxy
from tests.netns import Namespace

pytestmark = pytest.mark.integration

PASSWORD = "fleet-Pw-42"
FAST_FAIL = ("-N", "1", "-R", "1")      # ipmitool gives up after ~2 s instead of ~20 s


def _require_tools() -> None:
    missing = [t for t in ("ipmi_sim", "ipmitool") if shutil.which(t) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing} not installed (Debian packages openipmi, ipmitool)")
        pytest.skip(f"{missing} not installed (Debian packages openipmi, ipmitool)")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[list[ipmisim.SimBmc]]:  # type: ignore[no-untyped-def]
    _require_tools()
    with ipmisim.running_fleet(tmp_path_factory.mktemp("fleet"), 3, password=PASSWORD) as bmcs:
        yield bmcs


@pytest.fixture
def bmcs(fleet: list[ipmisim.SimBmc]) -> list[ipmisim.SimBmc]:
    """The module's fleet, every machine reset to off / no boot override / no calls."""
    for b in fleet:
        assert b.alive(), b.log()
        b.fail(None)
        b.set_power(False)
        b.set_boot("none")
        b.soft_off("obey")
        b.clear_calls()
    return fleet


def test_fleet_of_three_starts(bmcs: list[ipmisim.SimBmc]) -> None:
    assert len(bmcs) == 3
    assert len({b.port for b in bmcs}) == 3
    assert len({b.pid for b in bmcs}) == 3
    for b in bmcs:
        assert b.ping()
        assert (b.power(), b.boot()) == ("off", "none")
        assert b.access().port == b.port and b.access().driver == "ipmi"
        assert "admin@127.0.0.1" in b.access().describe()
        assert PASSWORD not in repr(b.access())


def test_power_on_off_status_agree_with_the_bmc(bmcs: list[ipmisim.SimBmc]) -> None:
    for i, b in enumerate(bmcs):
        assert "Chassis Power is off" in b.ipmitool("chassis", "power", "status")
        b.ipmitool("chassis", "power", "on")
        assert b.power() == "on"
        assert "Chassis Power is on" in b.ipmitool("chassis", "power", "status")
        # the other machines did not move
        assert [o.power() for o in bmcs if o is not b] == ["on"] * i + ["off"] * (2 - i)
    for b in bmcs:
        b.ipmitool("chassis", "power", "off")
        assert b.power() == "off"
        assert b.calls() == ["get power", "set power 1", "get power", "set power 0"]
        stamps = [t for t, _ in b.call_log()]
        assert stamps == sorted(stamps) and abs(stamps[-1] - time.time()) < 60


def test_state_changed_behind_the_bmc_is_reported(bmcs: list[ipmisim.SimBmc]) -> None:
    b = bmcs[1]
    b.set_power(True)
    assert "Chassis Power is on" in b.ipmitool("chassis", "power", "status")
    assert b.calls(sets_only=True) == []


def test_bootdev_reaches_the_chassis_control_program(bmcs: list[ipmisim.SimBmc]) -> None:
    b = bmcs[0]
    b.ipmitool("chassis", "bootdev", "pxe")
    assert (b.boot(), b.boot_device()) == ("pxe", "pxe")
    # ipmitool's boot-info-ack write makes ipmi_sim run "get boot" first
    assert b.calls() == ["get boot", "set boot pxe"]
    assert [o.boot() for o in bmcs[1:]] == ["none", "none"]
    # read back: the device comes from the program, the valid bit is never set
    out = b.ipmitool("chassis", "bootparam", "get", "5")
    assert "Force PXE" in out and "Boot Flag Invalid" in out
    assert b.ipmitool("raw", "0x00", "0x09", "5", "0", "0").split() == \
        ["01", "05", "00", "04", "00", "00", "00"]
    b.ipmitool("chassis", "bootdev", "disk")          # IPMI "default hard drive"
    assert (b.boot(), b.boot_device()) == ("default", "disk")
    b.ipmitool("chassis", "bootdev", "bios")
    assert (b.boot(), b.boot_device()) == ("bios", "bios-setup")
    b.ipmitool("chassis", "bootdev", "none")
    assert (b.boot(), b.boot_device()) == ("none", "default")
    # persistent / EFI bits are not passed on; selectors without a name fail (0xff)
    b.ipmitool("chassis", "bootdev", "pxe", "options=persistent,efiboot")
    assert b.boot() == "pxe"
    r = b.run_ipmitool("chassis", "bootdev", "safe")
    assert "Unspecified error" in r.stderr          # (ipmitool 1.8.19 still exits 0 here)
    assert b.boot() == "pxe"
    # parameter 3 (valid-bit clearing) is accepted and never reaches the program
    b.clear_calls()
    b.ipmitool("raw", "0x00", "0x08", "3", "0x08")
    assert b.calls() == []


def test_cycle_reset_soft_off_and_identify(bmcs: list[ipmisim.SimBmc]) -> None:
    b = bmcs[2]
    b.ipmitool("chassis", "power", "on")
    b.clear_calls()
    b.ipmitool("chassis", "power", "cycle")
    assert b.calls()[0] == "set power 0"
    deadline = time.monotonic() + 5
    while b.power() != "on" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert b.power() == "on"                        # ipmi_sim's 1 s timer powered it on
    assert b.calls(sets_only=True) == ["set power 0", "set power 1"]

    b.ipmitool("chassis", "power", "reset")
    assert b.resets() == 1 and b.power() == "on"

    b.soft_off("ignore")
    b.ipmitool("chassis", "power", "soft")
    assert b.power() == "on"
    b.soft_off(0.5)
    b.ipmitool("chassis", "power", "soft")
    assert "is on" in b.ipmitool("chassis", "power", "status")
    time.sleep(0.6)
    assert "is off" in b.ipmitool("chassis", "power", "status")
    b.set_power(True)
    b.soft_off("obey")
    b.ipmitool("chassis", "power", "soft")
    assert b.power() == "off"

    b.ipmitool("chassis", "identify", "force")
    assert b.identify() == "on"
    b.ipmitool("chassis", "identify", "20")
    assert b.identify() == "20s"
    b.ipmitool("chassis", "identify", "0")
    assert b.identify() == "off"
    r = b.run_ipmitool("chassis", "power", "diag")
    assert r.returncode != 0 and "Invalid data field" in r.stderr


def test_injected_program_failure_is_an_error_answer(bmcs: list[ipmisim.SimBmc]) -> None:
    b = bmcs[0]
    b.fail("power", "set")
    r = b.run_ipmitool("chassis", "power", "on")
    assert r.returncode != 0 and "Unspecified error" in r.stderr
    assert b.power() == "off"
    assert "is off" in b.ipmitool("chassis", "power", "status")    # get still works
    b.fail(None)
    b.ipmitool("chassis", "power", "on")
    assert b.power() == "on"


def test_wrong_password_and_cipher_suites(bmcs: list[ipmisim.SimBmc]) -> None:
    b = bmcs[1]
    r = b.run_ipmitool("chassis", "power", "on", password="wrong", timeout_opts=FAST_FAIL)
    assert r.returncode != 0 and "Unable to establish" in r.stderr
    r = b.run_ipmitool("chassis", "power", "status", username="nobody", timeout_opts=FAST_FAIL)
    assert r.returncode != 0
    assert b.calls() == []
    r = b.run_ipmitool("chassis", "power", "status", cipher=17, timeout_opts=FAST_FAIL)
    assert r.returncode != 0 and "invalid authentication algorithm" in r.stderr
    # suite 0 means no authentication: ipmi_sim then takes any password (documented hazard)
    r = b.run_ipmitool("chassis", "power", "status", cipher=0, password="wrong")
    assert r.returncode == 0 and "Chassis Power is off" in r.stdout


def test_proxy_pass_counts_both_directions(bmcs: list[ipmisim.SimBmc]) -> None:
    b = bmcs[0]
    with FaultProxy(b.port) as proxy:
        assert "is off" in b.ipmitool("chassis", "power", "status", port=proxy.port)
        c = proxy.counts()
    assert c["requests"] > 3 and c["requests"] == c["requests_relayed"] == c["replies"]
    assert c["requests_dropped"] == c["replies_dropped"] == 0 and c["clients"] == 1


def test_proxy_drop_alternate_ipmitool_retries_and_gets_the_answer(
        bmcs: list[ipmisim.SimBmc]) -> None:
    b = bmcs[0]
    with FaultProxy(b.port, mode="drop-alternate") as proxy:
        b.ipmitool("chassis", "power", "on", port=proxy.port)
        assert "is on" in b.ipmitool("chassis", "power", "status", port=proxy.port)
        c = proxy.counts()
    assert b.power() == "on"
    assert c["requests_dropped"] >= 4 and c["replies_dropped"] == 0
    # only requests were lost, so the BMC executed each command once
    assert b.calls(sets_only=True) == ["set power 1"]


def test_proxy_blackhole_fails_within_the_client_timeout(bmcs: list[ipmisim.SimBmc]) -> None:
    b = bmcs[1]
    with FaultProxy(b.port, mode="blackhole") as proxy:
        t0 = time.monotonic()
        r = b.run_ipmitool("chassis", "power", "on", port=proxy.port, timeout_opts=FAST_FAIL,
                           timeout=30)
        elapsed = time.monotonic() - t0
        c = proxy.counts()
    assert r.returncode != 0 and "Unable to establish" in r.stderr
    assert elapsed < 10
    assert c["requests"] >= 2 and c["requests_relayed"] == 0 and c["replies"] == 0
    assert b.calls() == [] and b.power() == "off"


def test_proxy_delay_and_mode_switch(bmcs: list[ipmisim.SimBmc]) -> None:
    b = bmcs[2]
    with FaultProxy(b.port, mode="delay", delay=0.1) as proxy:
        t0 = time.monotonic()
        assert "is off" in b.ipmitool("chassis", "power", "status", port=proxy.port)
        exchanges = proxy.counts()["replies"]
        assert time.monotonic() - t0 >= 2 * 0.1 * exchanges * 0.9
        proxy.set_mode("blackhole")
        r = b.run_ipmitool("chassis", "power", "status", port=proxy.port,
                           timeout_opts=FAST_FAIL)
        assert r.returncode != 0
        proxy.set_mode("pass")
        assert "is off" in b.ipmitool("chassis", "power", "status", port=proxy.port)


def test_restart_keeps_the_machine_and_port(bmcs: list[ipmisim.SimBmc]) -> None:
    b = bmcs[1]
    b.ipmitool("chassis", "power", "on")
    old_pid, port = b.pid, b.port
    b.restart()
    assert b.pid != old_pid and b.port == port
    with pytest.raises(ProcessLookupError):
        os.kill(old_pid, 0)
    assert "is on" in b.ipmitool("chassis", "power", "status")


def test_fleet_in_a_namespace_and_stop_by_pid(namespace: Namespace, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _require_tools()
    with ipmisim.running_fleet(tmp_path, 2, ns=namespace, password=PASSWORD) as pair:
        pids = [b.pid for b in pair]
        for b in pair:
            b.ipmitool("chassis", "power", "on")
            assert b.power() == "on"
        with FaultProxy(pair[0].port, ns=namespace) as proxy:
            assert "is on" in pair[0].ipmitool("chassis", "power", "status", port=proxy.port)
            assert proxy.counts()["replies"] > 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert namespace.procs == []
