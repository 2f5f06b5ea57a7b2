"""A test BMC for one QEMU VM: IPMI 2.0 (lanplus) in front, QEMU and QMP behind.

Like OpenStack's virtualbmc does for libvirt domains, but for a bare QEMU command line
and built on ``pyghmi.ipmi.bmc.Bmc``. Run as a script (inside the test's network
namespace, so QEMU's tap is there)::

    python tests/e2e/qemu_bmc.py --argv vm.json --qmp /tmp/x/qmp.sock --port 6230 \\
        --log /tmp/x/bmc.jsonl --qemu-log /tmp/x/qemu.log --nic nic0 --disk disk0 \\
        --boot-device hd

``vm.json`` is the VM's QEMU command line as a JSON list, *without* any boot order: no
``-boot``, no ``bootindex=``, no ``-qmp``, no ``-no-reboot`` (a QMP ``system_reset``
under ``-no-reboot`` ends QEMU). The NIC and the disk are ``-device ...,id=<nic>`` and
``-device ...,id=<disk>`` entries; the BMC adds the boot order to them.

- power on: start QEMU with ``-boot strict=on`` and a ``bootindex`` on the devices of
  the boot device in force (``network`` = the NIC, then the disk; ``hd`` = the disk
  only; ``default`` = ``--default-order``), plus ``-qmp unix:...``; "on" once QMP
  answers. The disk follows the NIC because under ``strict=on`` SeaBIOS 1.16 leaves a
  device without a ``bootindex`` out of INT 13h altogether, so iPXE's ``sanboot
  --drive 0x80`` fails with "Input/output error"; a real BIOS set to boot from the
  network still has its disk, and the appliance's ``local`` boot script relies on it.
- power state: on = the QEMU process is alive and QMP ``query-status`` says running.
- power off: QMP ``quit``; SIGKILL by PID if QEMU is still there after ``--stop-timeout``.
- power cycle: off, then on (a new QEMU process, so a new command line).
- power reset: QMP ``qom-set`` of each managed device's ``bootindex`` (QEMU rebuilds the
  firmware's ``bootorder`` fw_cfg file at every reset), then QMP ``system_reset``: a reset
  honours the boot device like a power-on does (checked with SeaBIOS and QEMU 7.2).
- soft-off: QMP ``system_powerdown`` (ACPI power button; the guest may ignore it).
- diag: QMP ``inject-nmi``.
- boot device: IPMI boot flags (parameter 5) valid/persistent/EFI bits. A "once"
  override is used by the next power-on or reset and then reverts to the persistent
  device; ``--once-settle`` seconds later (once the firmware has read its boot order)
  the running VM's ``bootindex`` goes back too, so a reboot the guest makes itself uses
  the persistent device again, as on a real machine. A set with the valid bit
  clear removes every override (``default``). The EFI bit is recorded and reported; it
  does not change the VM's firmware (that is in the command line).
- chassis identify: recorded and reported in chassis status.
- parameters 0, 3, 4 of the boot options are recorded and acknowledged; there is no
  60-second valid-bit timer.
- cycle, reset and diag on a VM that is off: completion code 0xD5 (not supported in
  present state), as many real BMCs answer; on when on, off / soft-off when off: 0.

Every request and every QEMU start or exit is one JSON line in ``--log`` (time,
request, parameters, completion code, boot order, QEMU command line) for tests to
assert on. SIGTERM / SIGINT stop QEMU (``quit``, then SIGKILL by PID) and exit.

pyghmi 1.6.19's client first asks for SHA-256 authentication, which pyghmi's server
answers with its fixed cipher suite 3 (SHA-1), and the client then fails; so open
session requests for anything but RAKP-HMAC-SHA1 are refused (RMCP+ status 0x11) and
the client falls back. ipmitool needs ``-I lanplus -C 3``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyghmi.ipmi.bmc as bmc
from pyghmi.ipmi.private import serversession
from pyghmi.ipmi.private import session as ipmisession

# -- pyghmi 1.6.19 server quirk: only RAKP-HMAC-SHA1 ---------------------------------


def sha1_only() -> None:
    """Refuse open session requests for anything but RAKP-HMAC-SHA1 (status 0x11), so
    pyghmi's client falls back from SHA-256 to what pyghmi's server can do. Applied by
    :func:`main` only: importing this module (for :func:`qmp`) changes nothing."""
    original = serversession.ServerSession.create_open_session_response
    if getattr(original, "sha1_only", False):
        return

    def open_session(self, request):  # type: ignore[no-untyped-def]
        # request[12]: the authentication algorithm of the open session request
        if len(request) > 12 and request[12] != 1:
            return bytearray([request[0], 0x11, 0, 0]) + bytearray(request[4:8])
        return original(self, request)

    open_session.sha1_only = True  # type: ignore[attr-defined]
    serversession.ServerSession.create_open_session_response = open_session

# -- IPMI constants -------------------------------------------------------------------

NETFN_CHASSIS = 0x00
CMD_CHASSIS_STATUS = 0x01
CMD_CHASSIS_CONTROL = 0x02
CMD_CHASSIS_IDENTIFY = 0x04
CMD_SET_BOOT_OPTIONS = 0x08
CMD_GET_BOOT_OPTIONS = 0x09

CC_OK = 0x00
CC_PARAM_NOT_SUPPORTED = 0x80
CC_INVALID_DATA = 0xCC
CC_BAD_LENGTH = 0xC7
CC_NOT_IN_PRESENT_STATE = 0xD5
CC_UNSPECIFIED = 0xFF

CONTROL_NAMES = {0: "power_off", 1: "power_on", 2: "power_cycle", 3: "power_reset",
                 4: "pulse_diag", 5: "power_shutdown"}
#: Boot flags data 2 bits 5:2 -> device name (IPMI 2.0 table 28-14), and back.
SELECTOR_NAMES = {0x0: "default", 0x1: "network", 0x2: "hd", 0x3: "safe", 0x5: "optical",
                  0x6: "setup", 0xF: "floppy"}
NAME_SELECTOR = {v: k for k, v in SELECTOR_NAMES.items()}
#: Devices this VM can boot from; "safe" (hard drive, safe mode) is the disk.
SUPPORTED = ("default", "network", "hd", "safe")
FLAG_VALID, FLAG_PERSISTENT, FLAG_EFI = 0x80, 0x40, 0x20

#: Chassis Control retransmissions (same client, sequence number and data) inside this
#: many seconds get the first answer again instead of a second power action.
RETRANSMIT_WINDOW = 10.0


class QmpError(Exception):
    pass


def qmp(path: str, command: str, arguments: dict | None = None,
        timeout: float = 5.0, wait_event: str | None = None) -> Any:
    """One QMP command over a fresh connection; its ``return`` value. ``wait_event``:
    then wait (up to ``timeout``) for that event too (QEMU carries out ``system_reset``
    later, in its main loop, and says ``RESET`` when it did)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        reader = sock.makefile("rb")
        events: list[str] = []

        def answer() -> dict:
            while True:
                line = reader.readline()
                if not line:
                    raise QmpError(f"QMP connection closed during {command}")
                msg = json.loads(line)
                if "event" in msg:
                    events.append(msg["event"])
                    continue
                return msg

        greeting = answer()
        if "QMP" not in greeting:
            raise QmpError(f"unexpected QMP greeting {greeting}")
        for execute, args in (("qmp_capabilities", None), (command, arguments)):
            msg: dict[str, Any] = {"execute": execute}
            if args:
                msg["arguments"] = args
            sock.sendall(json.dumps(msg).encode() + b"\n")
            reply = answer()
            if "error" in reply:
                raise QmpError(f"{execute}: {reply['error'].get('class')}: "
                               f"{reply['error'].get('desc')}")
        while wait_event is not None and wait_event not in events:
            line = reader.readline()
            if not line:
                raise QmpError(f"QMP connection closed before {wait_event}")
            msg = json.loads(line)
            if "event" in msg:
                events.append(msg["event"])
        return reply.get("return")
    except (OSError, ValueError) as exc:
        raise QmpError(f"{command}: {exc}") from None
    finally:
        sock.close()


class QemuBmc(bmc.Bmc):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__({args.username: args.password}, port=args.port, address=args.address)
        self.args = args
        self.base_argv: list[str] = json.loads(Path(args.argv).read_text())
        self.log_file = open(args.log, "a", buffering=1)  # noqa: SIM115 - lives as long as we do
        self.qemu_log = args.qemu_log
        self.qmp_path = args.qmp
        self.ids = {"network": args.nic, "hd": args.disk}
        self.default_order = [d.strip() for d in args.default_order.split(",") if d.strip()]
        for device in self.default_order:
            if device not in ("network", "hd"):
                raise SystemExit(f"--default-order: {device!r} is not network or hd")
        self._check_argv()
        # boot override state
        self.persistent: str | None = None if args.boot_device == "default" else args.boot_device
        self.once: str | None = None
        self.efi = args.efi
        self.param3 = 0
        self.identify = "off"
        self.identify_until = 0.0
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.last_argv: list[str] = []
        self.qom_works: bool | None = None
        #: when to give the running VM the persistent order back after a once boot
        self.revert_at: float | None = None
        self._recent: dict[tuple, tuple[float, int]] = {}
        self.stopping = False

    # -- bookkeeping ------------------------------------------------------------------

    def log(self, event: str, **fields: Any) -> None:
        now = datetime.now(UTC)
        record = {"t": now.isoformat(timespec="milliseconds"), "mono": round(time.monotonic(), 3),
                  "event": event, **fields}
        self.log_file.write(json.dumps(record) + "\n")
        brief = " ".join(f"{k}={v}" for k, v in fields.items() if k != "qemu_argv")
        print(f"qemu-bmc {now:%H:%M:%S.%f} {event} {brief}", file=sys.stderr, flush=True)

    def _check_argv(self) -> None:
        argv = self.base_argv
        for bad in ("-boot", "-qmp", "-no-reboot", "-daemonize"):
            if bad in argv:
                raise SystemExit(f"{self.args.argv}: remove {bad}; the BMC owns it")
        if any("bootindex=" in a for a in argv):
            raise SystemExit(f"{self.args.argv}: remove bootindex=; the BMC sets the order")
        for what, dev_id in self.ids.items():
            if dev_id and self._device_index(dev_id) is None:
                raise SystemExit(f"{self.args.argv}: no -device with id={dev_id} ({what})")

    def _device_index(self, dev_id: str) -> int | None:
        for i, arg in enumerate(self.base_argv[:-1]):
            if arg == "-device" and f"id={dev_id}" in self.base_argv[i + 1].split(","):
                return i + 1
        return None

    def boot_state(self) -> dict[str, Any]:
        return {"persistent": self.persistent or "default", "once": self.once,
                "efi": self.efi}

    def effective_device(self) -> tuple[str, bool]:
        """The device the next power-on or reset boots from, and whether it is a once."""
        if self.once is not None:
            return self.once, True
        return self.persistent or "default", False

    def order(self, device: str) -> list[str]:
        """QEMU device ids in boot order for an IPMI boot device name."""
        if device == "network":
            names = ["network", "hd"]  # the disk stays reachable (see the docstring)
        elif device in ("hd", "safe"):
            names = ["hd"]
        else:
            names = self.default_order
        return [self.ids[n] for n in names if self.ids.get(n)]

    def argv_for(self, order: list[str]) -> list[str]:
        argv = list(self.base_argv)
        for index, dev_id in enumerate(order, start=1):
            pos = self._device_index(dev_id)
            assert pos is not None
            argv[pos] += f",bootindex={index}"
        return [*argv, "-boot", "strict=on", "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]

    def _consume_once(self) -> dict[str, Any]:
        """A once override was just used: back to the persistent device. The running
        VM gets the persistent order too (for a reboot the guest makes itself), but only
        after ``--once-settle`` seconds: QEMU rebuilds the firmware's boot order at every
        reset, and SeaBIOS answers a reset of a machine that already ran POST with a
        second, guest-initiated reset of its own before it reads the order; taking the
        order back at once loses the override."""
        if self.once is None:
            return {}
        used, self.once = self.once, None
        self.revert_at = time.monotonic() + self.args.once_settle
        return {"once_consumed": used, "reverts_to": self.persistent or "default",
                "running_vm_revert_in": self.args.once_settle}

    def _revert_running_order(self) -> None:
        """Main loop: the settle time after a once boot is over."""
        if self.revert_at is None or time.monotonic() < self.revert_at:
            return
        self.revert_at = None
        if self.power_state() != "on":
            return
        order = self.order(self.persistent or "default")
        self.log("once-revert", boot_device=self.persistent or "default", boot_order=order,
                 qom_set=self._qom_set_order(order))

    # -- QEMU -------------------------------------------------------------------------

    def running(self) -> bool:
        """QEMU's process is alive (reaping it, and saying so, if it ended)."""
        if self.proc is None:
            return False
        rc = self.proc.poll()
        if rc is None:
            return True
        self.log("qemu-exited", pid=self.proc.pid, rc=rc)
        self.proc = None
        return False

    def power_state(self) -> str:
        if not self.running():
            return "off"
        for _ in range(3):
            try:
                status = qmp(self.qmp_path, "query-status", timeout=2)
                return "on" if status.get("status") == "running" else "off"
            except QmpError:
                if not self.running():
                    return "off"
                time.sleep(0.2)
        return "off"

    def start_qemu(self, reason: str) -> dict[str, Any]:
        device, once = self.effective_device()
        order = self.order(device)
        argv = self.argv_for(order)
        try:
            os.unlink(self.qmp_path)
        except FileNotFoundError:
            pass
        out = open(self.qemu_log, "ab")  # noqa: SIM115 - handed to QEMU
        out.write(f"--- {datetime.now(UTC).isoformat()} start ({reason}): "
                  f"{' '.join(argv)}\n".encode())
        out.flush()
        # same process group as the BMC: whoever stops the BMC's group stops QEMU too
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT)
        out.close()
        self.starts += 1
        self.last_argv = argv
        info: dict[str, Any] = {"reason": reason, "pid": self.proc.pid, "boot_device": device,
                                "once": once, "efi": self.efi, "boot_order": order,
                                "qemu_argv": argv}
        deadline = time.monotonic() + self.args.start_timeout
        state = "off"
        while time.monotonic() < deadline and self.running():
            try:
                state = qmp(self.qmp_path, "query-status", timeout=2).get("status", "?")
                break
            except QmpError:
                time.sleep(0.1)
        info["qmp_status"] = state
        if not self.running():
            info["error"] = "QEMU exited at start (see the QEMU log)"
        if once:
            info.update(self._consume_once())
        self.log("qemu-start", **info)
        return info

    def stop_qemu(self, reason: str) -> dict[str, Any]:
        if not self.running():
            return {"already": "off"}
        assert self.proc is not None
        self.revert_at = None
        pid = self.proc.pid
        info: dict[str, Any] = {"reason": reason, "pid": pid}
        try:
            qmp(self.qmp_path, "quit", timeout=2)
        except QmpError as exc:  # QEMU may close the connection before answering
            info["qmp_error"] = str(exc)
        try:
            self.proc.wait(self.args.stop_timeout)
            info["via"] = "qmp quit" if "qmp_error" not in info else "exited"
        except subprocess.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)  # by the PID we started, nothing else
            info["via"] = "SIGKILL"
            self.proc.wait(10)
        info["rc"] = self.proc.returncode
        self.proc = None
        self.log("qemu-stop", **info)
        return info

    def _qom_set_order(self, order: list[str]) -> dict[str, Any]:
        """Give the running VM a new boot order (used by QEMU at its next reset)."""
        result: dict[str, Any] = {}
        try:
            # clear first: QEMU refuses a bootindex another device still holds
            for dev_id in self.ids.values():
                if dev_id:
                    qmp(self.qmp_path, "qom-set", {"path": f"/machine/peripheral/{dev_id}",
                                                   "property": "bootindex", "value": -1})
            for index, dev_id in enumerate(order, start=1):
                qmp(self.qmp_path, "qom-set", {"path": f"/machine/peripheral/{dev_id}",
                                               "property": "bootindex", "value": index})
            for dev_id in self.ids.values():
                if dev_id:
                    result[dev_id] = qmp(self.qmp_path, "qom-get",
                                         {"path": f"/machine/peripheral/{dev_id}",
                                          "property": "bootindex"})
            want = {d: (order.index(d) + 1 if d in order else -1)
                    for d in self.ids.values() if d}
            self.qom_works = result == want
            if not self.qom_works:
                result["error"] = f"bootindex reads {result}, wanted {want}"
        except QmpError as exc:
            self.qom_works = False
            result["error"] = str(exc)
        return result

    def shutdown(self) -> None:
        self.stopping = True
        self.stop_qemu("BMC stopping")

    # -- pyghmi Bmc interface (return an IPMI completion code) --------------------------

    def get_power_state(self) -> str:
        return self.power_state()

    def power_on(self) -> int:
        if self.power_state() == "on":
            return CC_OK
        if self.running():  # alive but not running (paused, shut down): start afresh
            self.stop_qemu("power on: QEMU was not running")
        info = self.start_qemu("power on")
        return CC_UNSPECIFIED if "error" in info else CC_OK

    def power_off(self) -> int:
        self.stop_qemu("power off")
        return CC_OK

    def power_cycle(self) -> int:
        if self.power_state() != "on":
            return CC_NOT_IN_PRESENT_STATE
        self.stop_qemu("power cycle")
        info = self.start_qemu("power cycle")
        return CC_UNSPECIFIED if "error" in info else CC_OK

    def power_reset(self) -> int:
        if self.power_state() != "on":
            return CC_NOT_IN_PRESENT_STATE
        device, once = self.effective_device()
        order = self.order(device)
        self.revert_at = None  # this reset sets the order itself
        qom = self._qom_set_order(order)
        info: dict[str, Any] = {"boot_device": device, "once": once, "efi": self.efi,
                                "boot_order": order, "qom_set": qom,
                                "reset_honours_boot_device": self.qom_works}
        try:
            # QEMU resets later, in its main loop: wait for that before a once override
            # is taken back
            qmp(self.qmp_path, "system_reset", timeout=10, wait_event="RESET")
        except QmpError as exc:
            info["error"] = str(exc)
            self.log("qemu-reset", **info)
            return CC_UNSPECIFIED
        if once:
            info.update(self._consume_once())
        self.log("qemu-reset", **info)
        return CC_OK

    def power_shutdown(self) -> int:
        if self.power_state() != "on":
            return CC_OK
        try:
            qmp(self.qmp_path, "system_powerdown")
        except QmpError as exc:
            self.log("qmp-error", command="system_powerdown", error=str(exc))
            return CC_UNSPECIFIED
        return CC_OK

    def pulse_diag(self) -> int:
        if self.power_state() != "on":
            return CC_NOT_IN_PRESENT_STATE
        qmp(self.qmp_path, "inject-nmi")
        return CC_OK

    def get_system_guid(self):  # type: ignore[no-untyped-def]
        return self.uuid

    def get_boot_device(self) -> str:
        return self.effective_device()[0]

    def set_boot_device(self, bootdevice: str) -> None:  # used by Bmc's own handler only
        self.once = bootdevice

    # -- requests ---------------------------------------------------------------------

    def handle_raw_request(self, request, session):  # type: ignore[no-untyped-def]
        netfn, command = request["netfn"], request["command"]
        data = bytes(request.get("data") or b"")
        client = ":".join(str(x) for x in (session.sockaddr or ())[:2])
        handler = {
            (NETFN_CHASSIS, CMD_CHASSIS_STATUS): self._chassis_status,
            (NETFN_CHASSIS, CMD_CHASSIS_CONTROL): self._chassis_control,
            (NETFN_CHASSIS, CMD_CHASSIS_IDENTIFY): self._chassis_identify,
            (NETFN_CHASSIS, CMD_SET_BOOT_OPTIONS): self._set_boot_options,
            (NETFN_CHASSIS, CMD_GET_BOOT_OPTIONS): self._get_boot_options,
        }.get((netfn, command))
        if handler is None:
            self.log("request", client=client, netfn=netfn, command=command, data=data.hex(),
                     handled_by="pyghmi")
            return super().handle_raw_request(request, session)
        key = (client, getattr(session, "seqlun", None), netfn, command, data)
        now = time.monotonic()
        self._recent = {k: v for k, v in self._recent.items()
                        if now - v[0] < RETRANSMIT_WINDOW}
        if command == CMD_CHASSIS_CONTROL and key in self._recent:
            code = self._recent[key][1]
            self.log("request", client=client, request="chassis control (retransmission)",
                     data=data.hex(), code=code)
            return session.send_ipmi_response(code=code)
        try:
            code, reply, fields = handler(data)
        except Exception as exc:  # noqa: BLE001 - answer, log, keep serving
            code, reply, fields = CC_UNSPECIFIED, b"", {"exception": repr(exc),
                                                          "trace": traceback.format_exc()}
        if command == CMD_CHASSIS_CONTROL:
            self._recent[key] = (now, code)
        self.log("request", client=client, data=data.hex(), code=code,
                 reply=bytes(reply).hex(), **fields)
        session.send_ipmi_response(data=list(reply), code=code)
        return None

    def _chassis_status(self, data: bytes) -> tuple[int, bytes, dict]:
        state = self.power_state()
        identify = self.identify
        if identify == "temporary" and time.monotonic() > self.identify_until:
            identify = self.identify = "off"
        ident_bits = {"off": 0, "temporary": 1, "indefinite": 2}[identify]
        misc = 0x40 | (ident_bits << 4)  # identify supported + state
        return CC_OK, bytes([1 if state == "on" else 0, 0, misc, 0]), {
            "request": "chassis status", "power": state, "identify": identify}

    def _chassis_control(self, data: bytes) -> tuple[int, bytes, dict]:
        if not data:
            return CC_BAD_LENGTH, b"", {"request": "chassis control"}
        action = CONTROL_NAMES.get(data[0] & 0x0F)
        if action is None:
            return CC_INVALID_DATA, b"", {"request": f"chassis control {data[0]:#x}"}
        before, starts = self.power_state(), self.starts
        code = getattr(self, action)() or CC_OK
        fields = {"request": f"chassis control {action}", "power_before": before,
                  "power_after": self.power_state(), "boot": self.boot_state()}
        if self.starts != starts:  # this request started QEMU: with what
            fields["qemu_argv"] = self.last_argv
        return code, b"", fields

    def _chassis_identify(self, data: bytes) -> tuple[int, bytes, dict]:
        interval = data[0] if data else 15
        force = bool(len(data) > 1 and data[1] & 1)
        if force:
            self.identify = "indefinite"
        elif interval == 0:
            self.identify = "off"
        else:
            self.identify = "temporary"
            self.identify_until = time.monotonic() + interval
        return CC_OK, b"", {"request": "chassis identify", "interval": interval,
                            "force": force, "identify": self.identify}

    def _set_boot_options(self, data: bytes) -> tuple[int, bytes, dict]:
        if not data:
            return CC_BAD_LENGTH, b"", {"request": "set boot options"}
        param = data[0] & 0x7F
        fields: dict[str, Any] = {"request": f"set boot options param {param}"}
        if param in (0, 4):
            return CC_OK, b"", fields
        if param == 3:
            if len(data) < 2:
                return CC_BAD_LENGTH, b"", fields
            self.param3 = data[1]
            fields["param3"] = data[1]
            return CC_OK, b"", fields
        if param != 5:
            return CC_PARAM_NOT_SUPPORTED, b"", fields
        if len(data) < 3:
            return CC_BAD_LENGTH, b"", fields
        flags, selector = data[1], (data[2] >> 2) & 0x0F
        fields["request"] = "set boot device"
        if not flags & FLAG_VALID:
            self.once, self.persistent = None, None
            fields.update(cleared=True, boot=self.boot_state())
            return CC_OK, b"", fields
        device = SELECTOR_NAMES.get(selector)
        persistent, efi = bool(flags & FLAG_PERSISTENT), bool(flags & FLAG_EFI)
        fields.update(device=device or selector, persistent=persistent, efi=efi)
        if device not in SUPPORTED:
            return CC_INVALID_DATA, b"", fields
        if device == "safe":
            device = "hd"
        if persistent:
            self.persistent, self.once = (None if device == "default" else device), None
        else:
            self.once = device
        self.efi = efi
        fields["boot"] = self.boot_state()
        return CC_OK, b"", fields

    def _get_boot_options(self, data: bytes) -> tuple[int, bytes, dict]:
        param = data[0] & 0x7F if data else 5
        fields: dict[str, Any] = {"request": f"get boot options param {param}"}
        if param == 0:
            return CC_OK, bytes([1, 0, 0]), fields
        if param == 3:
            return CC_OK, bytes([1, 3, self.param3]), fields
        if param == 4:
            return CC_OK, bytes([1, 4, 0, 0]), fields
        if param != 5:
            return CC_PARAM_NOT_SUPPORTED, b"", fields
        fields["request"] = "get boot device"
        if self.once is not None:
            device, flags = self.once, FLAG_VALID
        elif self.persistent is not None:
            device, flags = self.persistent, FLAG_VALID | FLAG_PERSISTENT
        else:
            device, flags = "default", 0
        if flags and self.efi:
            flags |= FLAG_EFI
        fields["boot"] = self.boot_state()
        return CC_OK, bytes([1, 5, flags, NAME_SELECTOR[device] << 2, 0, 0, 0]), fields

    # -- main loop --------------------------------------------------------------------

    def serve(self) -> None:
        self.log("listening", address=self.args.address, port=self.args.port,
                 boot=self.boot_state(), default_order=self.default_order,
                 nic=self.ids["network"], disk=self.ids["hd"])
        if self.args.power_on:
            self.start_qemu("--power-on")
        while not self.stopping:
            ipmisession.Session.wait_for_rsp(timeout=0.5)
            if self.running():  # notice (and log) a VM that powered itself off
                self._revert_running_order()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--argv", required=True, help="JSON file: QEMU command line (list)")
    parser.add_argument("--qmp", required=True, help="QMP unix socket path to use")
    parser.add_argument("--log", required=True, help="JSON-lines request log (appended)")
    parser.add_argument("--qemu-log", required=True, help="QEMU's stdout/stderr (appended)")
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=623)
    parser.add_argument("--username", default="admin")
    parser.add_argument("--password", default=os.environ.get("QEMU_BMC_PASSWORD", "password"))
    parser.add_argument("--nic", default="nic0", help="-device id of the NIC ('' for none)")
    parser.add_argument("--disk", default="", help="-device id of the disk ('' for none)")
    parser.add_argument("--boot-device", default="default", choices=("default", "network", "hd"),
                        help="persistent boot device at start")
    parser.add_argument("--efi", action="store_true", help="EFI flag at start")
    parser.add_argument("--default-order", default="hd,network",
                        help="order for boot device 'default' (no override): the 'BIOS' order")
    parser.add_argument("--power-on", action="store_true", help="start the VM at once")
    parser.add_argument("--once-settle", type=float, default=15.0,
                        help="seconds after a once boot before the running VM gets the "
                             "persistent boot order back (firmware must have read it)")
    parser.add_argument("--start-timeout", type=float, default=10.0)
    parser.add_argument("--stop-timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    sha1_only()
    server = QemuBmc(args)

    def stop(signum, frame):  # type: ignore[no-untyped-def]
        server.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve()
    finally:
        server.log("stopping", starts=server.starts)
        server.stop_qemu("BMC stopping")
        server.log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
