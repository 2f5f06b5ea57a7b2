"""Redfish driver: a small HTTP(S) client on the standard library.

Why not pyghmi's Redfish support (``pyghmi.redfish.command``)? It speaks HTTPS only
(no ``http://`` BMCs or emulators), checks certificates by a fingerprint callback rather
than the system's CAs, logs in and discovers much more at construction than we need,
and reports failures as free-text exceptions we would have to parse into error kinds.
One request per exchange, read here, maps cleanly onto :class:`BmcError` kinds.

Each request opens its own connection with ``timeout`` as the socket timeout and sends
HTTP Basic credentials (no session: nothing to log out of, nothing to leak in a session
table). Answers are checked: a body that is not a JSON object, or a field we need that
is missing or has an unexpected value, is ``protocol``; an HTTP error is ``auth``
(401/403) or ``refused`` with the BMC's own Redfish message.

Lessons from the field honoured here:

- ``BootSourceOverrideMode``: Supermicro needs it in every boot PATCH or falls back to
  its default mode (DMTF Redfishtool #106), while HPE ProLiant iLO answers 400 to any
  PATCH carrying it, even unchanged (ansible community.general #3509). So it is sent,
  and on a 400 the PATCH is repeated without it only if the BMC already reports the
  requested mode; otherwise the 400 stands.
- Clearing an override sends ``BootSourceOverrideEnabled: Disabled`` with target
  ``None``; ``None`` is not checked against the allowable targets, which several BMCs
  (and sushy-tools) leave it out of while accepting it.
- Dell iDRAC answers 409 to ``On`` when the machine is on: ``on``/``off``/``soft-off``
  on a machine already in that steady state send nothing.
- ``PowerCycle`` is optional in Redfish: without it, cycle is ``ForceOff``, wait until
  the BMC reports off (power actions are asynchronous), then ``On``.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import time
import urllib.parse
from typing import Any

from appliance.power.driver import (
    AUTH,
    BOOT_DEVICES,
    BOOT_MODES,
    CONFIG,
    CONNECTION,
    POWER_ACTIONS,
    PROTOCOL,
    REFUSED,
    TIMEOUT,
    UNSUPPORTED,
    BmcAccess,
    BmcError,
    BootDevice,
    PowerDriver,
)

SYSTEMS = "/redfish/v1/Systems"
#: Largest answer read from a BMC; a system resource is a few KiB.
MAX_BODY = 4 * 1024 * 1024
MAX_REDIRECTS = 3

#: Power action -> ResetType (cycle is handled apart).
RESET_TYPES = {"on": "On", "off": "ForceOff", "soft-off": "GracefulShutdown",
               "reset": "ForceRestart"}
POWER_STATES = {"On": "on", "PoweringOn": "on", "Off": "off", "PoweringOff": "off"}
BOOT_TARGETS = {"pxe": "Pxe", "disk": "Hdd", "cdrom": "Cd", "bios-setup": "BiosSetup",
                "default": "None"}
TARGET_DEVICES = {v: k for k, v in BOOT_TARGETS.items()}
OVERRIDE_MODES = {"bios": "Legacy", "uefi": "UEFI"}
MODE_NAMES = {v: k for k, v in OVERRIDE_MODES.items()}


class _HttpError(Exception):
    """An HTTP error status, kept apart so callers can look at the status code."""

    def __init__(self, status: int, error: BmcError) -> None:
        super().__init__(str(error))
        self.status = status
        self.error = error


def _extended_message(body: bytes) -> str:
    """The Redfish error's message(s), else a short excerpt of the body."""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        err = doc["error"]
        infos = err.get("@Message.ExtendedInfo")
        messages = []
        if isinstance(infos, list):
            for info in infos:
                if isinstance(info, dict):
                    text = info.get("Message") or info.get("MessageId")
                    if isinstance(text, str) and text:
                        messages.append(text)
        if messages:
            return "; ".join(messages)
        for key in ("message", "code"):
            if isinstance(err.get(key), str) and err[key]:
                return err[key]
    text = body.decode("utf-8", errors="replace").strip()
    text = " ".join(text.split())
    return text[:200] if text else "no details"


class RedfishDriver(PowerDriver):
    name = "redfish"
    default_port = 443
    #: Seconds between power-state polls while a fallback cycle waits for "off".
    poll_interval = 0.5

    def __init__(self, access: BmcAccess, timeout: float) -> None:
        super().__init__(access, timeout)
        self.scheme, self.host, self.port = self._parse_address(access)
        #: How long the ForceOff-then-On cycle waits for the BMC to report off. Half the
        #: timeout: the caller abandons a whole attempt after ``timeout`` seconds.
        self.cycle_off_wait = max(1.0, timeout / 2)
        self._system_path: str | None = None
        self._ssl: ssl.SSLContext | None = None

    # -- addressing and transport ------------------------------------------------------

    @staticmethod
    def _parse_address(access: BmcAccess) -> tuple[str, str, int]:
        address = access.address.strip()
        if not address:
            raise BmcError(CONFIG, "redfish: no BMC address")
        bad = BmcError(CONFIG, f"redfish: address {address!r} is not a host, an IP or "
                               "an http(s)://host[:port] URL")
        if "://" in address:
            url = address
        elif address.startswith("[") or address.count(":") == 1:
            url = "https://" + address          # [v6]:port, [v6] or host:port
        elif ":" in address:
            url = f"https://[{address}]"        # a bare IPv6 address
        else:
            url = "https://" + address
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise bad from exc
        if parts.scheme not in ("http", "https") or not parts.hostname \
                or parts.path not in ("", "/") or parts.query or parts.fragment \
                or parts.username or parts.password:
            raise bad
        if port is None:
            port = access.port or (443 if parts.scheme == "https" else 80)
        return parts.scheme, parts.hostname, port

    def _where(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            if self.access.verify_tls:
                self._ssl = ssl.create_default_context()
            else:
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                self._ssl = ctx
        return self._ssl

    def _headers(self, has_body: bool) -> dict[str, str]:
        headers = {"Accept": "application/json", "OData-Version": "4.0",
                   "User-Agent": "appliance-redfish"}
        if self.access.username or self.access.password:
            pair = f"{self.access.username}:{self.access.password}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
        if has_body:
            headers["Content-Type"] = "application/json"
        return headers

    def _scrub(self, text: str) -> str:
        """Defence in depth against a BMC that echoes the password in an answer: nothing
        composed here contains it. Passwords under 4 characters are left alone, as
        replacing them would garble every message (and such a password is its own
        problem)."""
        password = self.access.password
        return text.replace(password, "***") if len(password) >= 4 else text

    def _fail(self, kind: str, what: str, detail: str) -> BmcError:
        return BmcError(kind, self._scrub(f"{what} at {self._where()}: {detail}"))

    def _exchange(self, method: str, path: str, body: bytes | None
                  ) -> tuple[int, dict[str, str], bytes]:
        what = f"{method} {path}"
        if self.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self.host, self.port, timeout=self.timeout, context=self._context())
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request(method, path, body=body, headers=self._headers(body is not None))
            response = conn.getresponse()
            data = response.read(MAX_BODY + 1)
            if len(data) > MAX_BODY:
                raise self._fail(PROTOCOL, what, f"answer larger than {MAX_BODY} bytes")
            headers = {k.lower(): v for k, v in response.getheaders()}
            return response.status, headers, data
        except TimeoutError as exc:
            raise self._fail(TIMEOUT, what, f"no complete answer within "
                                            f"{self.timeout:g} s") from exc
        except ssl.SSLCertVerificationError as exc:
            raise self._fail(CONFIG, what, f"TLS certificate not trusted ({exc.verify_message});"
                                           " install the BMC's CA or set verify_tls false"
                             ) from exc
        except ssl.SSLError as exc:
            raise self._fail(PROTOCOL, what, f"TLS failed: {exc.reason or exc}") from exc
        except (ConnectionError, http.client.RemoteDisconnected) as exc:
            raise self._fail(CONNECTION, what, f"{type(exc).__name__}: {exc}") from exc
        except socket.gaierror as exc:
            raise self._fail(CONNECTION, what, f"cannot resolve {self.host}: {exc}") from exc
        except http.client.HTTPException as exc:
            raise self._fail(PROTOCOL, what, f"malformed HTTP answer "
                                             f"({type(exc).__name__})") from exc
        except OSError as exc:  # unreachable host or network, and the like
            raise self._fail(CONNECTION, what, f"{exc.strerror or exc}") from exc
        finally:
            conn.close()

    def _request(self, method: str, path: str, payload: dict[str, Any] | None = None
                 ) -> tuple[int, bytes]:
        """One request; follows same-origin redirects; raises on an HTTP error status."""
        body = json.dumps(payload).encode() if payload is not None else None
        for _ in range(MAX_REDIRECTS + 1):
            status, headers, data = self._exchange(method, path, body)
            if status in (301, 302, 303, 307, 308) and "location" in headers:
                # sushy-tools answers a system's name with 307 to its UUID, for example.
                if status in (301, 302, 303) and method != "GET":
                    break
                target = urllib.parse.urlsplit(
                    urllib.parse.urljoin(self._where() + path, headers["location"]))
                if (target.scheme, target.hostname, target.port or self.port) != (
                        self.scheme, self.host, self.port):
                    raise self._fail(PROTOCOL, f"{method} {path}", "redirected to another "
                                     "host; credentials are not sent there")
                path = target.path + (f"?{target.query}" if target.query else "")
                continue
            break
        what = f"{method} {path}"
        if status in (401, 403):
            raise _HttpError(status, self._fail(
                AUTH, what, f"HTTP {status}: {_extended_message(data)} "
                            f"(user {self.access.username!r})"))
        if status >= 300:
            raise _HttpError(status, self._fail(
                REFUSED, what, f"HTTP {status}: {_extended_message(data)}"))
        return status, data

    def _get_json(self, path: str) -> dict[str, Any]:
        """GET a resource; an HTTP error status raises :class:`_HttpError`."""
        _, data = self._request("GET", path)
        try:
            doc = json.loads(data)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            excerpt = " ".join(data[:80].decode("utf-8", errors="replace").split())
            raise self._fail(PROTOCOL, f"GET {path}", f"answer is not a JSON object: "
                                                      f"{excerpt!r}")
        return doc

    def _get(self, path: str) -> dict[str, Any]:
        try:
            return self._get_json(path)
        except _HttpError as exc:
            raise exc.error from None

    def _send(self, method: str, path: str, payload: dict[str, Any]) -> None:
        try:
            self._request(method, path, payload)
        except _HttpError as exc:
            raise exc.error from None

    # -- the system ----------------------------------------------------------------------

    def _system_candidates(self) -> list[str]:
        """Paths of the systems the BMC lists."""
        members = self._get(SYSTEMS).get("Members")
        if not isinstance(members, list):
            raise self._fail(PROTOCOL, f"GET {SYSTEMS}", "no Members list")
        paths = []
        for member in members:
            path = member.get("@odata.id") if isinstance(member, dict) else None
            if not isinstance(path, str) or not path.startswith("/"):
                raise self._fail(PROTOCOL, f"GET {SYSTEMS}",
                                 f"member without @odata.id: {member!r}")
            paths.append(path.rstrip("/"))
        return paths

    def _system(self) -> dict[str, Any]:
        """GET the system resource (finding it first if need be)."""
        if self._system_path is None:
            wanted = self.access.system_id.strip()
            if wanted:
                path = wanted if wanted.startswith("/") else \
                    f"{SYSTEMS}/{urllib.parse.quote(wanted, safe='')}"
                path = path.rstrip("/")
                try:
                    system = self._get_json(path)
                except _HttpError as exc:
                    if exc.status != 404:
                        raise exc.error from None
                    try:
                        known = ", ".join(p.rsplit("/", 1)[-1] for p in
                                          self._system_candidates()) or "none"
                    except BmcError:
                        known = "(could not list them)"
                    raise self._fail(CONFIG, f"GET {path}", f"no such system; the BMC has: "
                                                           f"{known}") from None
            else:
                paths = self._system_candidates()
                if len(paths) != 1:
                    ids = ", ".join(p.rsplit("/", 1)[-1] for p in paths) or "none"
                    raise self._fail(CONFIG, f"GET {SYSTEMS}", f"{len(paths)} systems ({ids});"
                                     " set the machine's Redfish system id")
                path = paths[0]
                system = self._get(path)
            # Use the system's own path from now on (a name or alias may have redirected).
            own = system.get("@odata.id")
            self._system_path = own.rstrip("/") if isinstance(own, str) and \
                own.startswith("/") else path.rstrip("/")
            return system
        return self._get(self._system_path)

    def _field(self, doc: dict[str, Any], *keys: str) -> Any:
        value: Any = doc
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                raise self._fail(PROTOCOL, f"GET {self._system_path}",
                                 f"system has no {'.'.join(keys)}")
            value = value[key]
        return value

    # -- power ---------------------------------------------------------------------------

    def validate(self) -> None:
        self._system()

    def _power_state(self, system: dict[str, Any]) -> str:
        value = self._field(system, "PowerState")
        if value not in POWER_STATES:
            raise self._fail(PROTOCOL, f"GET {self._system_path}",
                             f"unexpected PowerState {value!r}")
        return POWER_STATES[value]

    def get_power_state(self) -> str:
        return self._power_state(self._system())

    def _reset_action(self, system: dict[str, Any]) -> tuple[str, list[str] | None]:
        """The Reset action's target and its allowable ResetTypes (None: not stated)."""
        action = system.get("Actions", {}).get("#ComputerSystem.Reset") \
            if isinstance(system.get("Actions"), dict) else None
        if not isinstance(action, dict):
            raise self._fail(UNSUPPORTED, f"GET {self._system_path}",
                             "system offers no ComputerSystem.Reset action")
        target = action.get("target")
        if not isinstance(target, str) or not target.startswith("/"):
            target = f"{self._system_path}/Actions/ComputerSystem.Reset"
        allowed = action.get("ResetType@Redfish.AllowableValues")
        info = action.get("@Redfish.ActionInfo")
        if allowed is None and isinstance(info, str) and info.startswith("/"):
            try:
                params = self._get(info).get("Parameters")
            except BmcError as exc:
                if exc.kind not in (REFUSED, PROTOCOL):
                    raise
                params = None
            for param in params if isinstance(params, list) else []:
                if isinstance(param, dict) and param.get("Name") == "ResetType":
                    allowed = param.get("AllowableValues")
        if allowed is not None and not (isinstance(allowed, list)
                                        and all(isinstance(v, str) for v in allowed)):
            raise self._fail(PROTOCOL, f"GET {self._system_path}",
                             f"ResetType allowable values are not a list: {allowed!r}")
        return target, allowed

    def _reset(self, target: str, allowed: list[str] | None, reset_type: str) -> None:
        if allowed is not None and reset_type not in allowed:
            raise self._fail(UNSUPPORTED, f"POST {target}", f"ResetType {reset_type} is not "
                             f"offered (allowed: {', '.join(allowed) or 'none'})")
        self._send("POST", target, {"ResetType": reset_type})

    def set_power_state(self, action: str) -> None:
        if action not in POWER_ACTIONS:
            raise BmcError(UNSUPPORTED, f"power action {action!r} is not one of "
                                        f"{', '.join(POWER_ACTIONS)}")
        system = self._system()
        self._power_state(system)  # a state we cannot read is an error, not a guess
        state = system["PowerState"]
        target, allowed = self._reset_action(system)
        if action == "cycle":
            if state in ("Off", "PoweringOff"):
                # Cycling a machine that is off turns it on (as the IPMI driver does);
                # one that is powering off is waited for first, as below.
                if state == "PoweringOff":
                    self._wait_off()
                self._reset(target, allowed, self._on_type(allowed))
            elif allowed is not None and "PowerCycle" in allowed:
                self._reset(target, allowed, "PowerCycle")
            else:
                self._reset(target, allowed, "ForceOff")
                self._wait_off()
                self._reset(target, allowed, self._on_type(allowed))
            return
        steady = "On" if action == "on" else "Off" if action in ("off", "soft-off") else None
        if state == steady:
            return  # already there; some BMCs (iDRAC) answer 409 otherwise
        reset_type = self._on_type(allowed) if action == "on" else RESET_TYPES[action]
        self._reset(target, allowed, reset_type)

    @staticmethod
    def _on_type(allowed: list[str] | None) -> str:
        if allowed is not None and "On" not in allowed and "ForceOn" in allowed:
            return "ForceOn"
        return "On"

    def _wait_off(self) -> None:
        deadline = time.monotonic() + self.cycle_off_wait
        while True:
            if self._field(self._system(), "PowerState") == "Off":
                return
            if time.monotonic() >= deadline:
                raise self._fail(TIMEOUT, f"cycle {self._system_path}",
                                 f"still not off {self.cycle_off_wait:g} s after ForceOff;"
                                 " On not sent")
            time.sleep(self.poll_interval)

    # -- management ----------------------------------------------------------------------

    def set_boot_device(self, device: str, persistent: bool, mode: str) -> None:
        if device not in BOOT_DEVICES:
            raise BmcError(UNSUPPORTED, f"boot device {device!r} is not one of "
                                        f"{', '.join(BOOT_DEVICES)}")
        if mode not in BOOT_MODES:
            raise BmcError(UNSUPPORTED, f"boot mode {mode!r} is not one of "
                                        f"{', '.join(BOOT_MODES)}")
        system = self._system()
        boot = self._field(system, "Boot")
        if not isinstance(boot, dict):
            raise self._fail(PROTOCOL, f"GET {self._system_path}", "Boot is not an object")
        where = f"PATCH {self._system_path}"
        target = BOOT_TARGETS[device]
        enabled = "Disabled" if device == "default" else \
            "Continuous" if persistent else "Once"
        checks = [("BootSourceOverrideEnabled", enabled)]
        if device != "default":
            checks.append(("BootSourceOverrideTarget", target))
        request: dict[str, Any] = {"BootSourceOverrideTarget": target,
                                   "BootSourceOverrideEnabled": enabled}
        if device != "default":
            # Clearing the override leaves the machine's mode alone: on some BMCs this
            # property is the firmware's boot mode itself, not just the override's.
            request["BootSourceOverrideMode"] = OVERRIDE_MODES[mode]
            checks.append(("BootSourceOverrideMode", OVERRIDE_MODES[mode]))
        for name, value in checks:
            allowed = boot.get(f"{name}@Redfish.AllowableValues")
            if isinstance(allowed, list) and value not in allowed:
                raise self._fail(UNSUPPORTED, where, f"{name} {value} is not offered "
                                 f"(allowed: {', '.join(map(str, allowed)) or 'none'})")
        try:
            self._request("PATCH", self._system_path or "", {"Boot": request})
        except _HttpError as exc:
            current = boot.get("BootSourceOverrideMode")
            if exc.status != 400 or "BootSourceOverrideMode" not in request \
                    or current != request["BootSourceOverrideMode"]:
                raise exc.error from None
            # HPE iLO rejects the property even unchanged; it already says what we want.
            del request["BootSourceOverrideMode"]
            self._send("PATCH", self._system_path or "", {"Boot": request})

    def get_boot_device(self) -> BootDevice:
        boot = self._field(self._system(), "Boot")
        where = f"GET {self._system_path}"
        if not isinstance(boot, dict):
            raise self._fail(PROTOCOL, where, "Boot is not an object")
        enabled = boot.get("BootSourceOverrideEnabled")
        target = boot.get("BootSourceOverrideTarget")
        if enabled == "Disabled" or (enabled in ("Once", "Continuous") and target == "None"):
            return BootDevice("default", persistent=True, mode=None)
        if enabled not in ("Once", "Continuous"):
            raise self._fail(PROTOCOL, where,
                             f"unexpected BootSourceOverrideEnabled {enabled!r}")
        if target not in TARGET_DEVICES:
            raise self._fail(PROTOCOL, where, f"boot override target {target!r} is not one "
                             f"of {', '.join(TARGET_DEVICES)}")
        mode_value = boot.get("BootSourceOverrideMode")
        if mode_value is not None and mode_value not in MODE_NAMES:
            raise self._fail(PROTOCOL, where,
                             f"unexpected BootSourceOverrideMode {mode_value!r}")
        return BootDevice(TARGET_DEVICES[target], persistent=enabled == "Continuous",
                          mode=MODE_NAMES.get(mode_value) if mode_value else None)

    def identify(self, on: bool) -> None:
        system = self._system()
        if self._patch_indicator(self._system_path or "", system, on):
            return
        # Some BMCs keep the light on the chassis only.
        links = system.get("Links")
        chassis = links.get("Chassis") if isinstance(links, dict) else None
        if isinstance(chassis, list) and chassis and isinstance(chassis[0], dict):
            path = chassis[0].get("@odata.id")
            if isinstance(path, str) and path.startswith("/"):
                if self._patch_indicator(path, self._get(path), on):
                    return
        raise self._fail(UNSUPPORTED, f"GET {self._system_path}",
                         "neither the system nor its chassis has an indicator light")

    def _patch_indicator(self, path: str, resource: dict[str, Any], on: bool) -> bool:
        if "LocationIndicatorActive" in resource:
            self._send("PATCH", path, {"LocationIndicatorActive": on})
            return True
        if "IndicatorLED" in resource:
            value = "Lit" if on else "Off"
            allowed = resource.get("IndicatorLED@Redfish.AllowableValues")
            if isinstance(allowed, list) and value not in allowed:
                raise self._fail(UNSUPPORTED, f"PATCH {path}", f"IndicatorLED {value} is not "
                                 f"offered (allowed: {', '.join(map(str, allowed))})")
            self._send("PATCH", path, {"IndicatorLED": value})
            return True
        return False
