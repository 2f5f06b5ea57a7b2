"""Redfish driver against a tiny local fake BMC, for what sushy-tools' emulator cannot show:
odd answers (not JSON, missing or strange fields, errors with Redfish extended info,
401/403), vendor quirks (a BMC refusing BootSourceOverrideMode, PowerCycle offered,
ActionInfo, LocationIndicatorActive, a light only on the chassis), timeouts, and the
exact request bodies sent. Everything else runs against the emulator in
tests/integration/test_power_redfish.py.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from appliance.power.driver import (
    AUTH,
    CONFIG,
    CONNECTION,
    PROTOCOL,
    REFUSED,
    TIMEOUT,
    UNSUPPORTED,
    BmcAccess,
    BmcError,
    BootDevice,
)
from appliance.power.redfish import RedfishDriver

pytestmark = pytest.mark.unit

PASSWORD = "Sup3r-secret-pw"
SYS = "/redfish/v1/Systems/1"
RESET = f"{SYS}/Actions/ComputerSystem.Reset"


def system(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "@odata.id": SYS,
        "Id": "1",
        "PowerState": "On",
        "Boot": {
            "BootSourceOverrideEnabled": "Disabled",
            "BootSourceOverrideTarget": "None",
            "BootSourceOverrideMode": "UEFI",
        },
        "IndicatorLED": "Off",
        "Actions": {"#ComputerSystem.Reset": {
            "target": RESET,
            "ResetType@Redfish.AllowableValues": ["On", "ForceOff", "GracefulShutdown",
                                                  "ForceRestart"],
        }},
    }
    doc.update(changes)
    return doc


Reply = tuple[int, Any]


class FakeBmc:
    """Routes (method, path) to a reply or a callable; records every request."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Reply | Callable[[dict[str, Any]], Reply]] = {}
        self.requests: list[dict[str, Any]] = []
        self.delay = 0.0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                request = {"method": self.command, "path": self.path,
                           "headers": dict(self.headers),
                           "json": json.loads(raw) if raw else None}
                fake.requests.append(request)
                if fake.delay:
                    time.sleep(fake.delay)
                route = fake.routes.get((self.command, self.path), (404, {"error": {
                    "message": "not found"}}))
                status, body = route(request) if callable(route) else route
                headers: dict[str, str] = {}
                if isinstance(body, tuple):
                    body, headers = body
                data = body if isinstance(body, bytes) else \
                    b"" if body is None else json.dumps(body).encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,),
                                       daemon=True)
        self.thread.start()

    def set_system(self, doc: dict[str, Any]) -> None:
        self.routes[("GET", SYS)] = (200, doc)

    def sent(self, method: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == method]

    def driver(self, timeout: float = 2.0, **access: Any) -> RedfishDriver:
        fields: dict[str, Any] = {"driver": "redfish", "address": "http://127.0.0.1",
                                  "port": self.port, "username": "admin",
                                  "password": PASSWORD, "system_id": SYS}
        fields.update(access)
        return RedfishDriver(BmcAccess(**fields), timeout)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def bmc() -> Iterator[FakeBmc]:
    fake = FakeBmc()
    try:
        yield fake
    finally:
        fake.close()


def kind_of(call: Callable[[], Any]) -> BmcError:
    with pytest.raises(BmcError) as info:
        call()
    assert PASSWORD not in str(info.value)
    return info.value


# -- odd answers ---------------------------------------------------------------------------

def test_non_json_body_is_protocol(bmc: FakeBmc) -> None:
    bmc.routes[("GET", SYS)] = (200, b"<html>BMC starting up</html>")
    err = kind_of(bmc.driver().get_power_state)
    assert err.kind == PROTOCOL and "not a JSON object" in str(err)


def test_json_that_is_not_an_object_is_protocol(bmc: FakeBmc) -> None:
    bmc.routes[("GET", SYS)] = (200, [1, 2])
    assert kind_of(bmc.driver().validate).kind == PROTOCOL


def test_missing_power_state_is_protocol(bmc: FakeBmc) -> None:
    doc = system()
    del doc["PowerState"]
    bmc.set_system(doc)
    err = kind_of(bmc.driver().get_power_state)
    assert err.kind == PROTOCOL and "PowerState" in str(err)


@pytest.mark.parametrize("value,expected", [("On", "on"), ("PoweringOn", "on"),
                                            ("Off", "off"), ("PoweringOff", "off")])
def test_power_state_mapping(bmc: FakeBmc, value: str, expected: str) -> None:
    bmc.set_system(system(PowerState=value))
    assert bmc.driver().get_power_state() == expected


def test_unknown_power_state_is_protocol(bmc: FakeBmc) -> None:
    bmc.set_system(system(PowerState="Paused"))
    err = kind_of(bmc.driver().get_power_state)
    assert err.kind == PROTOCOL and "Paused" in str(err)


def test_power_action_on_unknown_state_is_protocol_and_sends_nothing(bmc: FakeBmc) -> None:
    bmc.set_system(system(PowerState="Paused"))
    assert kind_of(lambda: bmc.driver().set_power_state("cycle")).kind == PROTOCOL
    assert bmc.sent("POST") == []


def test_500_with_extended_info_is_refused_with_its_message(bmc: FakeBmc) -> None:
    bmc.set_system(system(PowerState="Off"))
    bmc.routes[("POST", RESET)] = (500, {"error": {
        "code": "Base.1.8.GeneralError",
        "message": "A general error has occurred. See ExtendedInfo for more information.",
        "@Message.ExtendedInfo": [{"MessageId": "IDRAC.2.8.SYS446",
                                   "Message": "Unable to complete the operation because "
                                              "the host is in POST."}]}})
    err = kind_of(lambda: bmc.driver().set_power_state("on"))
    assert err.kind == REFUSED
    assert "HTTP 500" in str(err) and "host is in POST" in str(err)


def test_error_without_json_keeps_an_excerpt(bmc: FakeBmc) -> None:
    bmc.set_system(system(PowerState="Off"))
    bmc.routes[("POST", RESET)] = (503, b"Service Unavailable\n")
    err = kind_of(lambda: bmc.driver().set_power_state("on"))
    assert err.kind == REFUSED and "503" in str(err) and "Service Unavailable" in str(err)


@pytest.mark.parametrize("status", [401, 403])
def test_401_and_403_are_auth_and_never_show_the_password(bmc: FakeBmc, status: int) -> None:
    # A careless BMC that echoes the credentials must not leak them through us.
    bmc.routes[("GET", SYS)] = (status, {"error": {"message": f"bad login admin:{PASSWORD}"}})
    err = kind_of(bmc.driver().validate)
    assert err.kind == AUTH and f"HTTP {status}" in str(err) and "admin" in str(err)
    auth = bmc.requests[0]["headers"]["Authorization"]
    assert auth.startswith("Basic ")


def test_redirect_to_another_host_is_not_followed(bmc: FakeBmc) -> None:
    bmc.routes[("GET", SYS)] = (307, (b"", {"Location": "http://192.0.2.1/redfish/v1/x"}))
    assert kind_of(bmc.driver().validate).kind == PROTOCOL
    assert len(bmc.requests) == 1


def test_timeout_is_timeout(bmc: FakeBmc) -> None:
    bmc.set_system(system())
    bmc.delay = 1.0
    started = time.monotonic()
    err = kind_of(bmc.driver(timeout=0.3).get_power_state)
    assert err.kind == TIMEOUT and time.monotonic() - started < 0.9


def test_refused_port_is_connection() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    driver = RedfishDriver(BmcAccess("redfish", "http://127.0.0.1", port, "admin", PASSWORD),
                           2.0)
    assert kind_of(driver.validate).kind == CONNECTION


def test_plain_http_server_on_https_is_protocol(bmc: FakeBmc) -> None:
    err = kind_of(bmc.driver(address=f"https://127.0.0.1:{bmc.port}").validate)
    assert err.kind == PROTOCOL and "TLS" in str(err)


# -- discovery -----------------------------------------------------------------------------

def test_only_member_is_used_and_its_path_kept(bmc: FakeBmc) -> None:
    bmc.routes[("GET", "/redfish/v1/Systems")] = (200, {"Members": [{"@odata.id": SYS}]})
    bmc.set_system(system())
    driver = bmc.driver(system_id="")
    assert driver.get_power_state() == "on"
    assert driver.get_power_state() == "on"
    paths = [r["path"] for r in bmc.requests]
    assert paths == ["/redfish/v1/Systems", SYS, SYS]


def test_member_id_is_a_path_under_systems(bmc: FakeBmc) -> None:
    bmc.set_system(system())
    assert bmc.driver(system_id="1").get_power_state() == "on"


# -- power ---------------------------------------------------------------------------------

def test_cycle_uses_power_cycle_when_offered(bmc: FakeBmc) -> None:
    doc = system()
    doc["Actions"]["#ComputerSystem.Reset"]["ResetType@Redfish.AllowableValues"].append(
        "PowerCycle")
    bmc.set_system(doc)
    bmc.routes[("POST", RESET)] = (204, None)
    bmc.driver().set_power_state("cycle")
    assert [r["json"] for r in bmc.sent("POST")] == [{"ResetType": "PowerCycle"}]


def test_cycle_without_power_cycle_waits_for_off_then_on(bmc: FakeBmc) -> None:
    states = iter(["On", "On", "PoweringOff", "Off"])
    bmc.routes[("GET", SYS)] = lambda _: (200, system(PowerState=next(states)))
    bmc.routes[("POST", RESET)] = (204, None)
    driver = bmc.driver()
    driver.poll_interval = 0.01
    driver.set_power_state("cycle")
    assert [r["json"]["ResetType"] for r in bmc.sent("POST")] == ["ForceOff", "On"]
    posts = [i for i, r in enumerate(bmc.requests) if r["method"] == "POST"]
    assert posts[1] == len(bmc.requests) - 1  # On only after the BMC said Off


def test_cycle_gives_up_when_off_never_comes_and_sends_no_on(bmc: FakeBmc) -> None:
    bmc.set_system(system(PowerState="On"))
    bmc.routes[("POST", RESET)] = (204, None)
    driver = bmc.driver()
    driver.poll_interval, driver.cycle_off_wait = 0.01, 0.1
    err = kind_of(lambda: driver.set_power_state("cycle"))
    assert err.kind == TIMEOUT
    assert [r["json"]["ResetType"] for r in bmc.sent("POST")] == ["ForceOff"]


def test_cycle_when_off_turns_on(bmc: FakeBmc) -> None:
    bmc.set_system(system(PowerState="Off"))
    bmc.routes[("POST", RESET)] = (204, None)
    bmc.driver().set_power_state("cycle")
    assert [r["json"] for r in bmc.sent("POST")] == [{"ResetType": "On"}]


@pytest.mark.parametrize("action,state,reset_type", [
    ("on", "Off", "On"), ("off", "On", "ForceOff"), ("soft-off", "On", "GracefulShutdown"),
    ("reset", "On", "ForceRestart"), ("reset", "Off", "ForceRestart")])
def test_reset_types(bmc: FakeBmc, action: str, state: str, reset_type: str) -> None:
    bmc.set_system(system(PowerState=state))
    bmc.routes[("POST", RESET)] = (204, None)
    bmc.driver().set_power_state(action)
    assert [r["json"] for r in bmc.sent("POST")] == [{"ResetType": reset_type}]


@pytest.mark.parametrize("action,state", [("on", "On"), ("off", "Off"), ("soft-off", "Off")])
def test_already_there_sends_nothing(bmc: FakeBmc, action: str, state: str) -> None:
    bmc.set_system(system(PowerState=state))
    bmc.driver().set_power_state(action)
    assert bmc.sent("POST") == []


def test_reset_type_not_offered_is_unsupported(bmc: FakeBmc) -> None:
    doc = system()
    doc["Actions"]["#ComputerSystem.Reset"]["ResetType@Redfish.AllowableValues"] = [
        "On", "ForceOff"]
    bmc.set_system(doc)
    err = kind_of(lambda: bmc.driver().set_power_state("soft-off"))
    assert err.kind == UNSUPPORTED and "GracefulShutdown" in str(err)
    assert bmc.sent("POST") == []


def test_allowable_values_from_action_info(bmc: FakeBmc) -> None:
    doc = system(PowerState="Off")
    doc["Actions"]["#ComputerSystem.Reset"] = {
        "target": RESET, "@Redfish.ActionInfo": f"{SYS}/ResetActionInfo"}
    bmc.set_system(doc)
    bmc.routes[("GET", f"{SYS}/ResetActionInfo")] = (200, {"Parameters": [
        {"Name": "ResetType", "AllowableValues": ["ForceOn", "ForceOff"]}]})
    bmc.routes[("POST", RESET)] = (204, None)
    driver = bmc.driver()
    driver.set_power_state("on")
    assert [r["json"] for r in bmc.sent("POST")] == [{"ResetType": "ForceOn"}]
    assert kind_of(lambda: driver.set_power_state("reset")).kind == UNSUPPORTED


# -- boot ----------------------------------------------------------------------------------

@pytest.mark.parametrize("device,persistent,mode,boot", [
    ("pxe", False, "uefi", {"BootSourceOverrideTarget": "Pxe",
                            "BootSourceOverrideEnabled": "Once",
                            "BootSourceOverrideMode": "UEFI"}),
    ("disk", True, "bios", {"BootSourceOverrideTarget": "Hdd",
                            "BootSourceOverrideEnabled": "Continuous",
                            "BootSourceOverrideMode": "Legacy"}),
    ("cdrom", False, "bios", {"BootSourceOverrideTarget": "Cd",
                              "BootSourceOverrideEnabled": "Once",
                              "BootSourceOverrideMode": "Legacy"}),
    ("bios-setup", False, "uefi", {"BootSourceOverrideTarget": "BiosSetup",
                                   "BootSourceOverrideEnabled": "Once",
                                   "BootSourceOverrideMode": "UEFI"}),
    ("default", False, "uefi", {"BootSourceOverrideTarget": "None",
                                "BootSourceOverrideEnabled": "Disabled"}),
])
def test_boot_patch_bodies(bmc: FakeBmc, device: str, persistent: bool, mode: str,
                           boot: dict[str, str]) -> None:
    bmc.set_system(system())
    bmc.routes[("PATCH", SYS)] = (204, None)
    bmc.driver().set_boot_device(device, persistent, mode)
    assert [r["json"] for r in bmc.sent("PATCH")] == [{"Boot": boot}]


def reject_mode(request: dict[str, Any]) -> Reply:
    if "BootSourceOverrideMode" in request["json"]["Boot"]:
        return 400, {"error": {"@Message.ExtendedInfo": [{
            "Message": "The property BootSourceOverrideMode is a read only property "
                       "and cannot be assigned a value."}]}}
    return 200, {}


def test_mode_refused_but_already_set_retries_without_it(bmc: FakeBmc) -> None:
    bmc.set_system(system())  # reports UEFI
    bmc.routes[("PATCH", SYS)] = reject_mode
    bmc.driver().set_boot_device("pxe", False, "uefi")
    bodies = [r["json"]["Boot"] for r in bmc.sent("PATCH")]
    assert len(bodies) == 2 and "BootSourceOverrideMode" in bodies[0]
    assert bodies[1] == {"BootSourceOverrideTarget": "Pxe", "BootSourceOverrideEnabled": "Once"}


def test_mode_refused_and_different_is_refused(bmc: FakeBmc) -> None:
    bmc.set_system(system())  # reports UEFI; we ask for BIOS
    bmc.routes[("PATCH", SYS)] = reject_mode
    err = kind_of(lambda: bmc.driver().set_boot_device("pxe", False, "bios"))
    assert err.kind == REFUSED and "read only" in str(err)
    assert len(bmc.sent("PATCH")) == 1


def test_boot_target_not_offered_is_unsupported(bmc: FakeBmc) -> None:
    doc = system()
    doc["Boot"]["BootSourceOverrideTarget@Redfish.AllowableValues"] = ["Pxe", "Hdd"]
    bmc.set_system(doc)
    err = kind_of(lambda: bmc.driver().set_boot_device("cdrom", False, "uefi"))
    assert err.kind == UNSUPPORTED and "Cd" in str(err)
    assert bmc.sent("PATCH") == []


@pytest.mark.parametrize("boot,expected", [
    ({"BootSourceOverrideEnabled": "Once", "BootSourceOverrideTarget": "Pxe",
      "BootSourceOverrideMode": "UEFI"}, BootDevice("pxe", False, "uefi")),
    ({"BootSourceOverrideEnabled": "Continuous", "BootSourceOverrideTarget": "Hdd",
      "BootSourceOverrideMode": "Legacy"}, BootDevice("disk", True, "bios")),
    ({"BootSourceOverrideEnabled": "Once", "BootSourceOverrideTarget": "Cd"},
     BootDevice("cdrom", False, None)),
    ({"BootSourceOverrideEnabled": "Once", "BootSourceOverrideTarget": "BiosSetup",
      "BootSourceOverrideMode": "UEFI"}, BootDevice("bios-setup", False, "uefi")),
    ({"BootSourceOverrideEnabled": "Disabled", "BootSourceOverrideTarget": "Pxe"},
     BootDevice("default", True, None)),
    ({"BootSourceOverrideEnabled": "Continuous", "BootSourceOverrideTarget": "None"},
     BootDevice("default", True, None)),
])
def test_get_boot_device_mapping(bmc: FakeBmc, boot: dict[str, str],
                                 expected: BootDevice) -> None:
    bmc.set_system(system(Boot=boot))
    assert bmc.driver().get_boot_device() == expected


@pytest.mark.parametrize("boot", [
    {"BootSourceOverrideEnabled": "Once", "BootSourceOverrideTarget": "Usb"},
    {"BootSourceOverrideTarget": "Pxe"},
    {"BootSourceOverrideEnabled": "Once", "BootSourceOverrideTarget": "Pxe",
     "BootSourceOverrideMode": "Hybrid"},
])
def test_get_boot_device_odd_answers_are_protocol(bmc: FakeBmc, boot: dict[str, str]) -> None:
    bmc.set_system(system(Boot=boot))
    assert kind_of(bmc.driver().get_boot_device).kind == PROTOCOL


def test_missing_boot_is_protocol(bmc: FakeBmc) -> None:
    doc = system()
    del doc["Boot"]
    bmc.set_system(doc)
    assert kind_of(bmc.driver().get_boot_device).kind == PROTOCOL


# -- identify ------------------------------------------------------------------------------

def test_identify_prefers_location_indicator_active(bmc: FakeBmc) -> None:
    doc = system(LocationIndicatorActive=False)
    bmc.set_system(doc)
    bmc.routes[("PATCH", SYS)] = (204, None)
    bmc.driver().identify(True)
    assert [r["json"] for r in bmc.sent("PATCH")] == [{"LocationIndicatorActive": True}]


def test_identify_on_chassis_when_system_has_no_light(bmc: FakeBmc) -> None:
    doc = system(Links={"Chassis": [{"@odata.id": "/redfish/v1/Chassis/1"}]})
    del doc["IndicatorLED"]
    bmc.set_system(doc)
    bmc.routes[("GET", "/redfish/v1/Chassis/1")] = (200, {"IndicatorLED": "Lit"})
    bmc.routes[("PATCH", "/redfish/v1/Chassis/1")] = (204, None)
    bmc.driver().identify(False)
    assert [(r["path"], r["json"]) for r in bmc.sent("PATCH")] == [
        ("/redfish/v1/Chassis/1", {"IndicatorLED": "Off"})]


def test_identify_without_any_light_is_unsupported(bmc: FakeBmc) -> None:
    doc = system()
    del doc["IndicatorLED"]
    bmc.set_system(doc)
    assert kind_of(lambda: bmc.driver().identify(True)).kind == UNSUPPORTED


# -- addresses -----------------------------------------------------------------------------

@pytest.mark.parametrize("address,port,expected", [
    ("bmc1.example", 443, ("https", "bmc1.example", 443)),
    ("10.0.0.5", 8443, ("https", "10.0.0.5", 8443)),
    ("http://10.0.0.5", 8000, ("http", "10.0.0.5", 8000)),
    ("http://10.0.0.5:9000", 443, ("http", "10.0.0.5", 9000)),
    ("https://10.0.0.5/", 0, ("https", "10.0.0.5", 443)),
    ("http://10.0.0.5", 0, ("http", "10.0.0.5", 80)),
    ("fd00::5", 443, ("https", "fd00::5", 443)),
    ("[fd00::5]:8443", 443, ("https", "fd00::5", 8443)),
    ("https://[fd00::5]", 443, ("https", "fd00::5", 443)),
])
def test_address_forms(address: str, port: int, expected: tuple[str, str, int]) -> None:
    driver = RedfishDriver(BmcAccess("redfish", address, port, "u", "p"), 1.0)
    assert (driver.scheme, driver.host, driver.port) == expected


@pytest.mark.parametrize("address", ["", "ftp://10.0.0.5", "https://10.0.0.5/redfish/v1",
                                     "https://user:pw@10.0.0.5", "https://10.0.0.5:99999"])
def test_bad_addresses_are_config(address: str) -> None:
    err = kind_of(lambda: RedfishDriver(BmcAccess("redfish", address, 443, "u", PASSWORD), 1.0))
    assert err.kind == CONFIG

