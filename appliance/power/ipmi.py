"""IPMI 2.0 (lanplus) driver over pyghmi.

Only pyghmi's session and ``raw_command`` are used, with the chassis commands spelled
out here, rather than pyghmi's helpers: the helpers first ask the BMC for its device
ID and may switch to vendor (OEM) code paths that talk HTTPS to the BMC, and they
trust answers without checking their length. Every answer here is checked; a short or
odd one is a :class:`BmcError` (``protocol``), never a guess.

Lessons from the field (Digital Rebar's IPMI plugin, Ironic, MAAS) honoured here:

- Before setting the boot device, set boot option parameter 3 so the BMC does not
  clear the boot flags' valid bit after its 60-second timer: otherwise a machine that
  takes longer than a minute to reach POST forgets the PXE request.
- The EFI bit is set for UEFI machines; some firmware boots legacy PXE otherwise.
- "Persistent" and "once" are different flag bits; both are sent explicitly.
- Power cycle on a machine that is off is an error on many BMCs: it is turned on.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from appliance.power.driver import (
    AUTH,
    CONNECTION,
    PROTOCOL,
    REFUSED,
    TIMEOUT,
    UNSUPPORTED,
    BmcAccess,
    BmcError,
    BootDevice,
    PowerDriver,
)

NETFN_CHASSIS = 0x00
CMD_GET_CHASSIS_STATUS = 0x01
CMD_CHASSIS_CONTROL = 0x02
CMD_CHASSIS_IDENTIFY = 0x04
CMD_SET_BOOT_OPTIONS = 0x08
CMD_GET_BOOT_OPTIONS = 0x09

#: Chassis Control data byte per power action (IPMI 2.0 table 28-4).
CHASSIS_CONTROL = {"off": 0x00, "on": 0x01, "cycle": 0x02, "reset": 0x03, "soft-off": 0x05}
#: Boot flags data 2, bits 5:2: boot device selector (IPMI 2.0 table 28-14).
BOOT_SELECTOR = {"default": 0x0, "pxe": 0x1, "disk": 0x2, "cdrom": 0x5, "bios-setup": 0x6}
SELECTOR_DEVICE = {v: k for k, v in BOOT_SELECTOR.items()}
SELECTOR_DEVICE[0x3] = "disk"  # "hard drive, safe mode"
BOOT_FLAG_VALID = 0x80
BOOT_FLAG_PERSISTENT = 0x40
BOOT_FLAG_EFI = 0x20
#: Parameter 3 (boot flag valid bit clearing), bit 3: do not clear the valid bit when
#: the BMC's 60-second chassis timer expires.
DONT_CLEAR_ON_TIMEOUT = 0x08

#: IPMI completion codes worth naming in an error.
COMPLETION_CODES = {
    0xC0: "node busy",
    0xC1: "command not supported",
    0xC3: "timeout while processing command",
    0xC7: "request data length invalid",
    0xC9: "parameter out of range",
    0xCC: "invalid data field in request",
    0xD4: "insufficient privilege level",
    0xD5: "command not supported in present state",
    0x80: "parameter not supported",
}


_pyghmi_patched = False
_pyghmi_patch_lock = threading.Lock()


def _one_pyghmi_session_lock() -> None:
    """Make pyghmi's two session-table locks one lock, before any session exists.

    pyghmi 1.6.19 takes its ``WAITING_SESSIONS`` and ``KEEPALIVE_SESSIONS`` locks in
    both orders: ``wait_for_rsp`` holds the first while it runs an expired session's
    ``_timedout`` (which re-logs in through ``send_payload`` and takes the second), and
    ``send_payload`` holds the second while ``_xmit_packet`` takes the first. With
    calls to several BMCs from several threads, a login that times out at the moment
    another thread sends deadlocks both, and then every later IPMI call of the process
    waits forever. Seen here with a dead and a lossy BMC among healthy ones (every call
    timed out afterwards). One re-entrant lock cannot be taken in two orders. pyghmi's
    I/O thread takes neither lock, so waits inside a held lock still finish.
    """
    global _pyghmi_patched
    with _pyghmi_patch_lock:
        if _pyghmi_patched:
            return
        from pyghmi.ipmi.private import session

        session.WAITING_SESSIONS = session.KEEPALIVE_SESSIONS
        _pyghmi_patched = True


def _classify(message: str) -> str:
    lowered = message.lower()
    if any(w in lowered for w in ("password", "unauthorized", "privilege", "rakp",
                                  "authentication", "integrity")):
        return AUTH
    if not lowered or lowered == "none" or "timeout" in lowered or "no longer" in lowered \
            or "failed to initialize" in lowered:
        return TIMEOUT
    return PROTOCOL


class IpmiDriver(PowerDriver):
    name = "ipmi"
    default_port = 623

    def __init__(self, access: BmcAccess, timeout: float) -> None:
        super().__init__(access, timeout)
        self._command: Any = None

    # -- session ------------------------------------------------------------------

    def _session(self) -> Any:
        if self._command is not None:
            return self._command
        from pyghmi import exceptions as pyghmi_exc
        from pyghmi.ipmi import command

        _one_pyghmi_session_lock()
        self._forget_stale_session()
        try:
            self._command = command.Command(
                bmc=self.access.address, userid=self.access.username,
                password=self.access.password, port=self.access.port)
        except pyghmi_exc.IpmiException as exc:
            message = str(exc.args[0]) if exc.args and exc.args[0] else ""
            kind = _classify(message)
            raise BmcError(kind, f"IPMI login to {self.access.describe()} failed: "
                                 f"{message or 'no answer'}") from None
        except AttributeError as exc:
            if "errormsg" not in str(exc):
                raise
            message = self._lost_login_error()
            raise BmcError(_classify(message) if message else PROTOCOL,
                           f"IPMI login to {self.access.describe()} failed: "
                           f"{message or 'pyghmi gave no reason'}") from None
        except socket.gaierror as exc:
            raise BmcError(CONNECTION, f"cannot resolve {self.access.address}: {exc}") from None
        except OSError as exc:
            raise BmcError(CONNECTION, f"{self.access.describe()}: {exc}") from None
        return self._command

    def _raw(self, what: str, command: int, data: tuple[int, ...] = (),
             resend: bool = True) -> list[int]:
        """One chassis command; returns the response data after the completion code.

        ``resend=False`` for commands that must not run twice (power cycle, reset):
        pyghmi otherwise resends a command whose answer was lost, and the BMC, which
        did get it, runs it again. Without resending, a lost answer is a timeout whose
        outcome is unknown.
        """
        from pyghmi import exceptions as pyghmi_exc

        session = self._session()
        try:
            if resend:
                response = session.raw_command(netfn=NETFN_CHASSIS, command=command, data=data)
            else:
                response = self._send_once(session, command, data)
        except pyghmi_exc.IpmiException as exc:
            message = str(exc.args[0]) if exc.args and exc.args[0] else ""
            raise BmcError(_classify(message), f"{what}: {message or 'no answer'}") from None
        except OSError as exc:
            raise BmcError(CONNECTION, f"{what}: {exc}") from None
        if response is None:
            raise BmcError(TIMEOUT, f"{what}: no answer from {self.access.describe()} (the "
                                    "BMC may have acted)")
        if not isinstance(response, dict):
            raise BmcError(PROTOCOL, f"{what}: unexpected answer {response!r}")
        code = response.get("code", 0)
        if "error" in response or code:
            if code == 0xFFFF or response.get("error") == "timeout":
                raise BmcError(TIMEOUT, f"{what}: no answer from {self.access.describe()}")
            if code in (0xC1, 0x80):
                raise BmcError(UNSUPPORTED, f"{what}: the BMC says {COMPLETION_CODES[code]}")
            if code == 0xD4:
                raise BmcError(AUTH, f"{what}: the BMC says insufficient privilege level")
            reason = COMPLETION_CODES.get(code) or response.get("error") or "error"
            raise BmcError(REFUSED, f"{what}: the BMC answered completion code "
                                    f"0x{code:02x} ({reason})")
        payload = response.get("data")
        if payload is None:
            raise BmcError(PROTOCOL, f"{what}: answer without data")
        return list(payload)

    def _send_once(self, command_obj: Any, command: int, data: tuple[int, ...]) -> Any:
        """Send a command exactly once and wait for its answer until the deadline.

        pyghmi's ``retry=False`` sends without waiting at all, so the answer is awaited
        here: a callback records it while pyghmi's event loop runs.
        """
        from pyghmi.ipmi.private import session as pyghmi_session

        box: dict[str, Any] = {}
        ipmi_session = command_obj.ipmi_session
        ipmi_session.raw_command(netfn=NETFN_CHASSIS, command=command, data=data,
                                 retry=False, callback=lambda rsp: box.setdefault("r", rsp))
        deadline = time.monotonic() + max(1.0, self.timeout * 0.8)
        try:
            while "r" not in box:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                pyghmi_session.Session.wait_for_rsp(timeout=min(0.2, left))
        finally:
            # With a callback, pyghmi leaves the command bookkeeping to the caller.
            ipmi_session.incommand = False
            while ipmi_session.evq:
                ipmi_session.evq.popleft().set()
        return box["r"]

    def _session_key(self) -> tuple[Any, ...]:
        """pyghmi's key for a session being set up (bmc, user, password, port, kg)."""
        return (self.access.address, self.access.username, self.access.password,
                self.access.port, None)

    def _lost_login_error(self) -> str:
        """The reason of a failed login that pyghmi 1.6.19 lost in a race.

        Its I/O thread marks a failed session broken (in ``logout``) a moment before it
        stores the reason, and the waiting caller can read ``errormsg`` in between and
        get AttributeError. The broken session is still in ``initting_sessions`` (see
        :meth:`_forget_stale_session`); its reason is there once the I/O thread is done.
        """
        from pyghmi.ipmi.private import session

        for _ in range(20):
            message = getattr(session.Session.initting_sessions.get(self._session_key()),
                              "errormsg", None)
            if message:
                return str(message)
            time.sleep(0.01)
        return ""

    def _forget_stale_session(self) -> None:
        """Drop pyghmi's cached half-open session for this BMC and these credentials.

        pyghmi 1.6.19 registers a session being set up under a key with the user and
        password as str, but removes it with them as bytes, so the entry outlives the
        session: the next login with the same credentials is handed the old, logged-out
        (or broken) session and fails with "Session no longer connected". Calls to one
        BMC are serialised by the caller, so no other login is in progress here.
        """
        from pyghmi.ipmi.private import session

        session.Session.initting_sessions.pop(self._session_key(), None)

    def close(self) -> None:
        if self._command is None:
            self._forget_stale_session()
            return
        try:
            self._command.ipmi_session.logout()
        except Exception:  # noqa: BLE001 - a failed logout must not mask the result
            pass
        self._command = None
        self._forget_stale_session()

    # -- interface ----------------------------------------------------------------

    def validate(self) -> None:
        self.get_power_state()

    def get_power_state(self) -> str:
        data = self._raw("get chassis status", CMD_GET_CHASSIS_STATUS)
        if len(data) < 3:
            raise BmcError(PROTOCOL, f"get chassis status: answer of {len(data)} bytes, "
                                     "expected at least 3")
        return "on" if data[0] & 0x01 else "off"

    def set_power_state(self, action: str) -> None:
        if action not in CHASSIS_CONTROL:
            raise BmcError(UNSUPPORTED, f"power action {action!r} is not one of "
                                        f"{', '.join(CHASSIS_CONTROL)}")
        if action == "cycle" and self.get_power_state() == "off":
            action = "on"
        self._raw(f"chassis control {action}", CMD_CHASSIS_CONTROL, (CHASSIS_CONTROL[action],),
                  resend=action not in ("cycle", "reset"))

    def set_boot_device(self, device: str, persistent: bool, mode: str) -> None:
        if device not in BOOT_SELECTOR:
            raise BmcError(UNSUPPORTED, f"boot device {device!r} is not one of "
                                        f"{', '.join(BOOT_SELECTOR)}")
        self._raw("set boot option 3 (keep the boot flags past the 60 s timer)",
                  CMD_SET_BOOT_OPTIONS, (0x03, DONT_CLEAR_ON_TIMEOUT))
        if device == "default":
            flags = 0x00
        else:
            flags = BOOT_FLAG_VALID
            if persistent:
                flags |= BOOT_FLAG_PERSISTENT
            if mode == "uefi":
                flags |= BOOT_FLAG_EFI
        selector = BOOT_SELECTOR[device] << 2
        self._raw(f"set boot flags ({device}, {'persistent' if persistent else 'once'}, "
                  f"{mode})", CMD_SET_BOOT_OPTIONS, (0x05, flags, selector, 0x00, 0x00, 0x00))

    def get_boot_device(self) -> BootDevice:
        data = self._raw("get boot flags", CMD_GET_BOOT_OPTIONS, (0x05, 0x00, 0x00))
        if len(data) < 4 or (data[1] & 0x7F) != 0x05:
            raise BmcError(PROTOCOL, f"get boot flags: unexpected answer {bytes(data).hex()}")
        flags, selector_byte = data[2], data[3]
        if not flags & BOOT_FLAG_VALID:
            return BootDevice("default", persistent=True, mode=None)
        selector = (selector_byte >> 2) & 0x0F
        device = SELECTOR_DEVICE.get(selector)
        if device is None:
            raise BmcError(PROTOCOL, f"get boot flags: unknown device selector {selector:#x}")
        return BootDevice(device, persistent=bool(flags & BOOT_FLAG_PERSISTENT),
                          mode="uefi" if flags & BOOT_FLAG_EFI else "bios")

    def identify(self, on: bool) -> None:
        # Interval 0 turns it off; "force on" (byte 2 bit 0) keeps it on indefinitely.
        data = (0x00, 0x01) if on else (0x00,)
        self._raw(f"chassis identify {'on' if on else 'off'}", CMD_CHASSIS_IDENTIFY, data)
