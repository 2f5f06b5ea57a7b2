"""Redfish driver against sushy-tools' emulator (the BMC emulator OpenStack Ironic tests with).

The emulator runs as a subprocess (``python -m sushy_tools.emulator.main``, the
``sushy-emulator`` entry point, in this interpreter) on 127.0.0.1 with its *fake* systems
driver, so no libvirt or OpenStack is needed, HTTP Basic auth from a bcrypt htpasswd
file, and its own state directory (by default it keeps state in /tmp/sushy-emulator,
shared between runs). It is stopped by PID.

Every change is cross-checked by reading the emulator's own REST resource with a plain
HTTP GET (an independent reader), and power actions also by the emulator's log, which
names each ResetType it received.

What the emulator does (sushy-tools 2.2, ``fakedriver.py``) and the tests allow for:
power changes land 1-11 s after the request (so states are polled); ForceRestart shows
Off at once, then On; PowerCycle is not offered (so cycle is ForceOff, wait, On);
BootSourceOverrideEnabled is ignored and always reported Continuous (so "once" is checked
here only as far as target and mode go: the exact PATCH body is a unit test); BiosSetup
is not among the allowable targets.
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.power.driver import (
    AUTH,
    CONFIG,
    CONNECTION,
    UNSUPPORTED,
    BmcAccess,
    BmcError,
    BootDevice,
)
from appliance.power.redfish import RedfishDriver

pytestmark = pytest.mark.integration

USER = "rfadmin"
PASSWORD = "s3cret-" + secrets.token_hex(4)
NODE_A = "5c1f0a6e-0000-4000-8000-00000000000a"
NODE_B = "5c1f0a6e-0000-4000-8000-00000000000b"
#: The fake driver applies a power change 1-11 s after the request.
POWER_SETTLE = 25.0


def _require_sushy_tools() -> None:
    """sushy-tools comes with the test extras (``pip install -e '.[test]'``)."""
    try:
        import sushy_tools  # noqa: F401
    except ImportError:
        pytest.fail("sushy-tools is missing: install the test extras (pip install -e "
                    "'.[test]'), as tests/run-all.sh does")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Emulator:
    proc: subprocess.Popen
    scheme: str
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rest(self, path: str) -> dict[str, Any]:
        """The independent reader: a plain authenticated GET of the emulator's resource."""
        import ssl

        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        request = urllib.request.Request(self.url + path,
                                         headers={"Authorization": f"Basic {token}"})
        context = ssl._create_unverified_context() if self.scheme == "https" else None
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return json.load(response)

    def system(self, uuid: str = NODE_A) -> dict[str, Any]:
        return self.rest(f"/redfish/v1/Systems/{uuid}")

    def reset_types_since(self, offset: int) -> list[str]:
        """ResetTypes the emulator logged (``System "<id>" power state set to "<type>"``)."""
        found = []
        for line in self.log()[offset:].splitlines():
            if f'System "{NODE_A}" power state set to "' in line:
                found.append(line.rsplit('"', 2)[-2])
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_emulator(workdir: Path, systems: list[dict[str, Any]], tls: bool) -> Emulator:
    import bcrypt  # a dependency of sushy-tools

    workdir.mkdir(parents=True, exist_ok=True)
    htpasswd = workdir / "htpasswd"
    digest = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    htpasswd.write_text(f"{USER}:{digest}\n")
    port = free_port()
    config = [
        "import logging",
        "logging.basicConfig(level=logging.INFO)  # log each ResetType received",
        "SUSHY_EMULATOR_FAKE_DRIVER = True",
        f"SUSHY_EMULATOR_FAKE_SYSTEMS = {systems!r}",
        f"SUSHY_EMULATOR_STATE_DIR = {str(workdir / 'state')!r}",
        f"SUSHY_EMULATOR_AUTH_FILE = {str(htpasswd)!r}",
        "SUSHY_EMULATOR_LISTEN_IP = '127.0.0.1'",
        f"SUSHY_EMULATOR_LISTEN_PORT = {port}",
    ]
    if tls:
        if shutil.which("openssl") is None:
            pytest.fail("openssl is needed to make the emulator's self-signed certificate")
        cert, key = workdir / "cert.pem", workdir / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", str(key), "-out", str(cert)],
                       check=True, capture_output=True, timeout=60)
        config += [f"SUSHY_EMULATOR_SSL_CERT = {str(cert)!r}",
                   f"SUSHY_EMULATOR_SSL_KEY = {str(key)!r}"]
    conf = workdir / "emulator.conf"
    conf.write_text("\n".join(config) + "\n")
    log_path = workdir / "emulator.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "sushy_tools.emulator.main",
                                 "--config", str(conf)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=workdir)
    emu = Emulator(proc, "https" if tls else "http", port, log_path)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            pytest.fail(f"sushy-emulator exited with {proc.returncode}:\n{emu.log()[-3000:]}")
        try:
            emu.rest("/redfish/v1/")  # the service root needs no credentials
            return emu
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                emu.stop()
                pytest.fail(f"sushy-emulator did not answer in 30 s:\n{emu.log()[-3000:]}")
            time.sleep(0.2)


def fake_system(uuid: str, name: str) -> dict[str, Any]:
    return {"uuid": uuid, "name": name, "power_state": "Off", "external_notifier": False,
            "nics": [{"mac": f"52:54:00:aa:00:{uuid[-2:]}", "ip": "127.0.0.1"}]}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """Plain HTTP, Basic auth, two systems (so discovery has to be told which)."""
    _require_sushy_tools()
    emu = start_emulator(tmp_path_factory.mktemp("sushy-http"),
                         [fake_system(NODE_A, "node-a"), fake_system(NODE_B, "node-b")],
                         tls=False)
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture(scope="module")
def tls_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """HTTPS with a self-signed certificate, Basic auth, one system."""
    _require_sushy_tools()
    emu = start_emulator(tmp_path_factory.mktemp("sushy-https"),
                         [fake_system(NODE_A, "only")], tls=True)
    try:
        yield emu
    finally:
        emu.stop()


def make_driver(emu: Emulator, timeout: float = 10.0, **access: Any) -> RedfishDriver:
    fields: dict[str, Any] = {"driver": "redfish", "address": "http://127.0.0.1",
                              "port": emu.port, "username": USER, "password": PASSWORD,
                              "system_id": NODE_A}
    fields.update(access)
    driver = RedfishDriver(BmcAccess(**fields), timeout)
    # The emulator takes up to 11 s to power off; the fallback cycle must outwait it.
    driver.cycle_off_wait = POWER_SETTLE
    return driver


def wait_power(emu: Emulator, driver: RedfishDriver, state: str) -> None:
    redfish = {"on": "On", "off": "Off"}[state]
    deadline = time.monotonic() + POWER_SETTLE
    while driver.get_power_state() != state:
        if time.monotonic() > deadline:
            pytest.fail(f"still not {state} after {POWER_SETTLE} s: "
                        f"{emu.system()['PowerState']}")
        time.sleep(0.25)
    assert emu.system()["PowerState"] == redfish  # the independent reader agrees


def ensure_power(emu: Emulator, driver: RedfishDriver, state: str) -> None:
    driver.set_power_state(state)
    wait_power(emu, driver, state)


def expect_error(call: Any, kind: str) -> BmcError:
    with pytest.raises(BmcError) as info:
        call()
    assert info.value.kind == kind, str(info.value)
    assert PASSWORD not in str(info.value)
    return info.value


# -- power ---------------------------------------------------------------------------------

def test_validate_and_status(emulator: Emulator) -> None:
    driver = make_driver(emulator)
    driver.validate()
    reported = emulator.system()["PowerState"]
    assert driver.get_power_state() == {"On": "on", "Off": "off"}[reported]


def test_on_off_and_soft_off(emulator: Emulator) -> None:
    driver = make_driver(emulator)
    ensure_power(emulator, driver, "off")

    mark = len(emulator.log())
    driver.set_power_state("on")
    wait_power(emulator, driver, "on")
    assert emulator.reset_types_since(mark) == ["On"]
    assert emulator.system(NODE_B)["PowerState"] == "Off"  # the other system is untouched

    mark = len(emulator.log())
    driver.set_power_state("off")
    wait_power(emulator, driver, "off")
    assert emulator.reset_types_since(mark) == ["ForceOff"]

    ensure_power(emulator, driver, "on")
    mark = len(emulator.log())
    driver.set_power_state("soft-off")
    wait_power(emulator, driver, "off")
    assert emulator.reset_types_since(mark) == ["GracefulShutdown"]

    mark = len(emulator.log())
    driver.set_power_state("off")  # already off: nothing is sent
    assert emulator.reset_types_since(mark) == []


def test_reset(emulator: Emulator) -> None:
    driver = make_driver(emulator)
    ensure_power(emulator, driver, "on")
    mark = len(emulator.log())
    driver.set_power_state("reset")
    assert emulator.reset_types_since(mark) == ["ForceRestart"]
    # The emulator shows the restart as off at once, on again 1-11 s later (whole seconds
    # of its clock, so the off can be too short to catch; the log above is the witness).
    wait_power(emulator, driver, "on")


def test_cycle_from_on_is_force_off_then_on(emulator: Emulator) -> None:
    driver = make_driver(emulator)
    ensure_power(emulator, driver, "on")
    allowed = emulator.system()["Actions"]["#ComputerSystem.Reset"][
        "ResetType@Redfish.AllowableValues"]
    assert "PowerCycle" not in allowed
    mark = len(emulator.log())
    driver.set_power_state("cycle")
    assert emulator.reset_types_since(mark) == ["ForceOff", "On"]
    wait_power(emulator, driver, "on")


def test_cycle_from_off_turns_on(emulator: Emulator) -> None:
    driver = make_driver(emulator)
    ensure_power(emulator, driver, "off")
    mark = len(emulator.log())
    driver.set_power_state("cycle")
    assert emulator.reset_types_since(mark) == ["On"]
    wait_power(emulator, driver, "on")


# -- boot ----------------------------------------------------------------------------------

@pytest.mark.parametrize("device,persistent,mode", [
    ("pxe", False, "uefi"), ("pxe", True, "uefi"), ("pxe", False, "bios"),
    ("pxe", True, "bios"), ("disk", True, "uefi"), ("cdrom", False, "bios"),
])
def test_boot_device(emulator: Emulator, device: str, persistent: bool, mode: str) -> None:
    driver = make_driver(emulator)
    driver.set_boot_device(device, persistent, mode)
    boot = emulator.system()["Boot"]
    assert boot["BootSourceOverrideTarget"] == {"pxe": "Pxe", "disk": "Hdd", "cdrom": "Cd"}[device]
    assert boot["BootSourceOverrideMode"] == {"uefi": "UEFI", "bios": "Legacy"}[mode]
    # The emulator ignores BootSourceOverrideEnabled and always reports Continuous; the
    # driver must report what the BMC says, not what it asked for.
    assert boot["BootSourceOverrideEnabled"] == "Continuous"
    assert driver.get_boot_device() == BootDevice(device, persistent=True, mode=mode)


def test_boot_default_clears_the_override(emulator: Emulator) -> None:
    driver = make_driver(emulator)
    driver.set_boot_device("pxe", True, "uefi")
    driver.set_boot_device("default", False, "uefi")
    boot = emulator.system()["Boot"]
    assert boot["BootSourceOverrideTarget"] == "None"
    assert boot["BootSourceOverrideMode"] == "UEFI"  # clearing leaves the mode alone
    assert driver.get_boot_device() == BootDevice("default", persistent=True, mode=None)


def test_boot_target_not_offered_is_unsupported(emulator: Emulator) -> None:
    driver = make_driver(emulator)
    driver.set_boot_device("disk", True, "uefi")
    assert "BiosSetup" not in emulator.system()["Boot"][
        "BootSourceOverrideTarget@Redfish.AllowableValues"]
    err = expect_error(lambda: driver.set_boot_device("bios-setup", False, "uefi"), UNSUPPORTED)
    assert "BiosSetup" in str(err)
    assert emulator.system()["Boot"]["BootSourceOverrideTarget"] == "Hdd"  # unchanged


# -- identify ------------------------------------------------------------------------------

def test_identify(emulator: Emulator) -> None:
    driver = make_driver(emulator)
    driver.identify(True)
    assert emulator.system()["IndicatorLED"] == "Lit"
    driver.identify(False)
    assert emulator.system()["IndicatorLED"] == "Off"
    driver.identify(True)
    assert emulator.system()["IndicatorLED"] == "Lit"


# -- access and discovery ------------------------------------------------------------------

@pytest.mark.parametrize("username,password", [(USER, "wrong-password"), ("nobody", PASSWORD),
                                               ("", "")])
def test_wrong_credentials_are_auth(emulator: Emulator, username: str, password: str) -> None:
    driver = make_driver(emulator, username=username, password=password)
    for call in (driver.validate, driver.get_power_state,
                 lambda: driver.set_power_state("on")):
        err = expect_error(call, AUTH)
        if password:
            assert password not in str(err)


@pytest.mark.parametrize("system_id", ["no-such-system", "/redfish/v1/Systems/no-such-system"])
def test_wrong_system_id_is_config(emulator: Emulator, system_id: str) -> None:
    err = expect_error(make_driver(emulator, system_id=system_id).validate, CONFIG)
    assert "no-such-system" in str(err) and NODE_A in str(err) and NODE_B in str(err)


def test_system_by_path_and_by_name(emulator: Emulator) -> None:
    by_path = make_driver(emulator, system_id=f"/redfish/v1/Systems/{NODE_A}")
    assert by_path.get_power_state() in ("on", "off")
    # The emulator answers a name with a 307 to the UUID; the driver follows and keeps it.
    by_name = make_driver(emulator, system_id="node-a")
    by_name.validate()
    assert by_name._system_path == f"/redfish/v1/Systems/{NODE_A}"


def test_several_systems_without_system_id_is_config(emulator: Emulator) -> None:
    err = expect_error(make_driver(emulator, system_id="").validate, CONFIG)
    assert NODE_A in str(err) and NODE_B in str(err)


def test_unreachable_port_is_connection_quickly(emulator: Emulator) -> None:
    driver = make_driver(emulator, port=free_port())
    started = time.monotonic()
    expect_error(driver.get_power_state, CONNECTION)
    assert time.monotonic() - started < 5


# -- HTTPS ---------------------------------------------------------------------------------

def test_https_self_signed_with_bare_address(tls_emulator: Emulator) -> None:
    # A bare IP means https; verify_tls false accepts the self-signed certificate; the only
    # system is found without a system id.
    driver = make_driver(tls_emulator, address="127.0.0.1", system_id="", verify_tls=False)
    driver.validate()
    assert driver._system_path == f"/redfish/v1/Systems/{NODE_A}"
    ensure_power(tls_emulator, driver, "on")
    driver.set_boot_device("pxe", False, "uefi")
    assert tls_emulator.system()["Boot"]["BootSourceOverrideTarget"] == "Pxe"
    assert driver.get_boot_device().device == "pxe"
    expect_error(make_driver(tls_emulator, address="127.0.0.1", verify_tls=False,
                             password="wrong-password").validate, AUTH)


def test_https_untrusted_certificate_is_config(tls_emulator: Emulator) -> None:
    driver = make_driver(tls_emulator, address=f"https://127.0.0.1:{tls_emulator.port}",
                         port=443, verify_tls=True)
    err = expect_error(driver.validate, CONFIG)
    assert "certificate" in str(err) and "verify_tls" in str(err)


def test_http_error_is_not_swallowed(emulator: Emulator) -> None:
    # Sanity of the independent reader itself: it must fail on a wrong password too.
    token = base64.b64encode(f"{USER}:nope".encode()).decode()
    request = urllib.request.Request(emulator.url + f"/redfish/v1/Systems/{NODE_A}",
                                     headers={"Authorization": f"Basic {token}"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 401
